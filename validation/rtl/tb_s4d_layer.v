// tb_s4d_layer: replays one layer of a bundle (validation/sim.py layer_vectors writes the directory).
//
// Run from inside the layer directory (file names are relative). Loads every weight word and the
// input u with $readmemh, then for every sequence resets the layer and hands it one step after
// another through the valid/ready handshake, with a pseudo-random number of idle cycles before
// in_valid and of stall cycles on out_ready, so the handshake is exercised. Every accepted output
// (x_re, x_im, y, za, zb, sig, act, out and the saturation flags) is dumped to rtl/<tensor>.memh;
// validation/sim.py compares the dump with the expected words (compare_dumps).
`timescale 1ns / 1ps
module tb_s4d_layer;
    parameter integer H = 1;
    parameter integer N2 = 1;
    parameter integer NB = 1;
    parameter integer L = 1;
    parameter integer W_U = 16;
    parameter integer W_A = 8;
    parameter integer W_B = 8;
    parameter integer W_C = 8;
    parameter integer W_D = 8;
    parameter integer W_X = 16;
    parameter integer W_Y = 16;
    parameter integer X_MIN = -32768;
    parameter integer X_MAX = 32767;
    parameter integer Y_MIN = -32768;
    parameter integer Y_MAX = 32767;
    parameter integer W_W = 8;
    parameter integer W_ZA = 16;
    parameter integer ZA_MIN = -32768;
    parameter integer ZA_MAX = 32767;
    parameter integer W_ZB = 12;
    parameter integer ZB_MIN = -2048;
    parameter integer ZB_MAX = 2047;
    parameter integer W_SIG = 21;
    parameter integer W_ACT = 8;
    parameter integer ACT_MIN = -127;
    parameter integer ACT_MAX = 127;
    parameter integer HAS_POST = 1;
    parameter integer RESIDUAL = 0;
    parameter integer W_OUT = 16;
    parameter integer OUT_MIN = -32768;
    parameter integer OUT_MAX = 32767;
    parameter integer SEED = 1;
    localparam integer W_M = 64;
    localparam integer W_R = 8;
    localparam integer W_BIAS = 64;
    localparam integer HN = H * N2;
    localparam integer NLUT = ZB_MAX - ZB_MIN + 1;

    reg clk = 1'b0;
    reg rst = 1'b1;
    always #5 clk = ~clk;

    // word memories, named as the files
    reg [W_A-1:0] f_abar_re [0:HN-1];
    reg [W_A-1:0] f_abar_im [0:HN-1];
    reg [W_B-1:0] f_bbar_re [0:HN-1];
    reg [W_B-1:0] f_bbar_im [0:HN-1];
    reg [W_C-1:0] f_c_re [0:HN-1];
    reg [W_C-1:0] f_c_im [0:HN-1];
    reg [W_D-1:0] f_d [0:H-1];
    reg [W_M-1:0] f_m_a_re [0:HN-1];
    reg [W_M-1:0] f_m_a_im_to_re [0:HN-1];
    reg [W_M-1:0] f_m_a_im_to_im [0:HN-1];
    reg [W_M-1:0] f_m_b_re [0:HN-1];
    reg [W_M-1:0] f_m_b_im [0:HN-1];
    reg [W_R-1:0] f_r_x [0:HN-1];
    reg [W_M-1:0] f_m_c_re [0:H-1];
    reg [W_M-1:0] f_m_c_im [0:H-1];
    reg [W_M-1:0] f_m_d [0:H-1];
    reg [W_R-1:0] f_r_y [0:H-1];
    reg [W_W-1:0] f_mix_a_w [0:H*H-1];
    reg [W_W-1:0] f_mix_b_w [0:H*H-1];
    reg [W_BIAS-1:0] f_mix_a_b [0:H-1];
    reg [W_BIAS-1:0] f_mix_b_b [0:H-1];
    reg [W_M-1:0] f_mix_a_m [0:H-1];
    reg [W_M-1:0] f_mix_b_m [0:H-1];
    reg [W_R-1:0] f_mix_a_r [0:H-1];
    reg [W_R-1:0] f_mix_b_r [0:H-1];
    reg [W_SIG-1:0] f_sig_lut [0:NLUT-1];
    reg [W_M-1:0] f_glu_m [0:H-1];
    reg [W_R-1:0] f_glu_r [0:H-1];
    reg [W_M-1:0] f_post_m0 [0:H-1];
    reg [W_M-1:0] f_post_m1 [0:H-1];
    reg [W_BIAS-1:0] f_post_offset [0:H-1];
    reg [1:0] f_post_sign [0:H-1];
    reg [W_R-1:0] f_post_r [0:H-1];
    reg [W_U-1:0] f_u [0:NB*L*H-1];

    reg [HN*W_A-1:0] abar_re, abar_im;
    reg [HN*W_B-1:0] bbar_re, bbar_im;
    reg [HN*W_C-1:0] c_re, c_im;
    reg [H*W_D-1:0] d;
    reg [HN*W_M-1:0] m_a_re, m_a_im_to_re, m_a_im_to_im, m_b_re, m_b_im;
    reg [HN*W_R-1:0] r_x;
    reg [H*W_M-1:0] m_c_re, m_c_im, m_d, mix_a_m, mix_b_m, glu_m, post_m0, post_m1;
    reg [H*W_R-1:0] r_y, mix_a_r, mix_b_r, glu_r, post_r;
    reg [H*H*W_W-1:0] mix_a_w, mix_b_w;
    reg [H*W_BIAS-1:0] mix_a_b, mix_b_b, post_offset;
    reg [H*2-1:0] post_sign;
    reg [NLUT*W_SIG-1:0] sig_lut;
    reg [H*W_U-1:0] u;
    reg in_valid = 1'b0;
    reg out_ready = 1'b0;
    wire in_ready, out_valid;
    wire [HN*W_X-1:0] x_re, x_im;
    wire [H*W_Y-1:0] y;
    wire [HN-1:0] sat_x_re, sat_x_im;
    wire [H-1:0] sat_y, sat_za, sat_zb, sat_act, sat_out;
    wire [H*W_ZA-1:0] za;
    wire [H*W_ZB-1:0] zb;
    wire [H*W_SIG-1:0] sig;
    wire [H*W_ACT-1:0] act;
    wire [H*W_OUT-1:0] out;

    s4d_layer #(.H(H), .N2(N2), .W_U(W_U), .W_A(W_A), .W_B(W_B), .W_C(W_C), .W_D(W_D), .W_X(W_X), .W_Y(W_Y),
                .X_MIN(X_MIN), .X_MAX(X_MAX), .Y_MIN(Y_MIN), .Y_MAX(Y_MAX), .W_W(W_W), .W_ZA(W_ZA),
                .ZA_MIN(ZA_MIN), .ZA_MAX(ZA_MAX), .W_ZB(W_ZB), .ZB_MIN(ZB_MIN), .ZB_MAX(ZB_MAX), .W_SIG(W_SIG),
                .W_ACT(W_ACT), .ACT_MIN(ACT_MIN), .ACT_MAX(ACT_MAX), .HAS_POST(HAS_POST), .RESIDUAL(RESIDUAL),
                .W_OUT(W_OUT), .OUT_MIN(OUT_MIN), .OUT_MAX(OUT_MAX)) dut (
        .clk(clk), .rst(rst), .in_valid(in_valid), .in_ready(in_ready), .u(u),
        .abar_re(abar_re), .abar_im(abar_im), .bbar_re(bbar_re), .bbar_im(bbar_im), .c_re(c_re), .c_im(c_im),
        .d(d), .m_a_re(m_a_re), .m_a_im_to_re(m_a_im_to_re), .m_a_im_to_im(m_a_im_to_im), .m_b_re(m_b_re),
        .m_b_im(m_b_im), .r_x(r_x), .m_c_re(m_c_re), .m_c_im(m_c_im), .m_d(m_d), .r_y(r_y),
        .mix_a_w(mix_a_w), .mix_a_b(mix_a_b), .mix_a_m(mix_a_m), .mix_a_r(mix_a_r),
        .mix_b_w(mix_b_w), .mix_b_b(mix_b_b), .mix_b_m(mix_b_m), .mix_b_r(mix_b_r),
        .sig_lut(sig_lut), .glu_m(glu_m), .glu_r(glu_r), .post_m0(post_m0), .post_m1(post_m1),
        .post_offset(post_offset), .post_sign(post_sign), .post_r(post_r),
        .out_valid(out_valid), .out_ready(out_ready), .x_re(x_re), .x_im(x_im), .y(y),
        .sat_x_re(sat_x_re), .sat_x_im(sat_x_im), .sat_y(sat_y), .za(za), .zb(zb), .sig(sig), .act(act),
        .out(out), .sat_za(sat_za), .sat_zb(sat_zb), .sat_act(sat_act), .sat_out(sat_out));

    integer b, t, i, steps = 0, idle;
    integer fd [0:14];
    reg [31:0] lfsr;

    task next_random;  // xorshift32: idle / stall cycle counts
        begin
            lfsr = lfsr ^ (lfsr << 13);
            lfsr = lfsr ^ (lfsr >> 17);
            lfsr = lfsr ^ (lfsr << 5);
        end
    endtask

    task dump;  // the accepted step's words, in file order (channel, then mode)
        begin
            for (i = 0; i < HN; i = i + 1) begin
                $fwrite(fd[0], "%h\n", x_re[i*W_X +: W_X]);
                $fwrite(fd[1], "%h\n", x_im[i*W_X +: W_X]);
                $fwrite(fd[2], "%h\n", sat_x_re[i]);
                $fwrite(fd[3], "%h\n", sat_x_im[i]);
            end
            for (i = 0; i < H; i = i + 1) begin
                $fwrite(fd[4], "%h\n", y[i*W_Y +: W_Y]);
                $fwrite(fd[5], "%h\n", sat_y[i]);
                $fwrite(fd[6], "%h\n", za[i*W_ZA +: W_ZA]);
                $fwrite(fd[7], "%h\n", sat_za[i]);
                $fwrite(fd[8], "%h\n", zb[i*W_ZB +: W_ZB]);
                $fwrite(fd[9], "%h\n", sat_zb[i]);
                $fwrite(fd[10], "%h\n", sig[i*W_SIG +: W_SIG]);
                $fwrite(fd[11], "%h\n", act[i*W_ACT +: W_ACT]);
                $fwrite(fd[12], "%h\n", sat_act[i]);
                $fwrite(fd[13], "%h\n", out[i*W_OUT +: W_OUT]);
                $fwrite(fd[14], "%h\n", sat_out[i]);
            end
        end
    endtask

    initial begin
        lfsr = SEED;
        $readmemh("Abar_re.memh", f_abar_re);
        $readmemh("Abar_im.memh", f_abar_im);
        $readmemh("Bbar_re.memh", f_bbar_re);
        $readmemh("Bbar_im.memh", f_bbar_im);
        $readmemh("C_re.memh", f_c_re);
        $readmemh("C_im.memh", f_c_im);
        $readmemh("D.memh", f_d);
        $readmemh("m_a_re.memh", f_m_a_re);
        $readmemh("m_a_im_to_re.memh", f_m_a_im_to_re);
        $readmemh("m_a_im_to_im.memh", f_m_a_im_to_im);
        $readmemh("m_b_re.memh", f_m_b_re);
        $readmemh("m_b_im.memh", f_m_b_im);
        $readmemh("r_x.memh", f_r_x);
        $readmemh("m_c_re.memh", f_m_c_re);
        $readmemh("m_c_im.memh", f_m_c_im);
        $readmemh("m_d.memh", f_m_d);
        $readmemh("r_y.memh", f_r_y);
        $readmemh("mix_a_W.memh", f_mix_a_w);
        $readmemh("mix_b_W.memh", f_mix_b_w);
        $readmemh("mix_a_b.memh", f_mix_a_b);
        $readmemh("mix_b_b.memh", f_mix_b_b);
        $readmemh("mix_a_m0.memh", f_mix_a_m);
        $readmemh("mix_b_m0.memh", f_mix_b_m);
        $readmemh("mix_a_r.memh", f_mix_a_r);
        $readmemh("mix_b_r.memh", f_mix_b_r);
        $readmemh("sig_lut.memh", f_sig_lut);
        $readmemh("glu_m0.memh", f_glu_m);
        $readmemh("glu_r.memh", f_glu_r);
        if (HAS_POST) begin
            $readmemh("post_m0.memh", f_post_m0);
            if (RESIDUAL)
                $readmemh("post_m1.memh", f_post_m1);
            $readmemh("post_offset.memh", f_post_offset);
            $readmemh("post_sign.memh", f_post_sign);
            $readmemh("post_r.memh", f_post_r);
        end
        $readmemh("u.memh", f_u);
        for (i = 0; i < HN; i = i + 1) begin
            abar_re[i*W_A +: W_A] = f_abar_re[i];
            abar_im[i*W_A +: W_A] = f_abar_im[i];
            bbar_re[i*W_B +: W_B] = f_bbar_re[i];
            bbar_im[i*W_B +: W_B] = f_bbar_im[i];
            c_re[i*W_C +: W_C] = f_c_re[i];
            c_im[i*W_C +: W_C] = f_c_im[i];
            m_a_re[i*W_M +: W_M] = f_m_a_re[i];
            m_a_im_to_re[i*W_M +: W_M] = f_m_a_im_to_re[i];
            m_a_im_to_im[i*W_M +: W_M] = f_m_a_im_to_im[i];
            m_b_re[i*W_M +: W_M] = f_m_b_re[i];
            m_b_im[i*W_M +: W_M] = f_m_b_im[i];
            r_x[i*W_R +: W_R] = f_r_x[i];
        end
        for (i = 0; i < H*H; i = i + 1) begin
            mix_a_w[i*W_W +: W_W] = f_mix_a_w[i];
            mix_b_w[i*W_W +: W_W] = f_mix_b_w[i];
        end
        for (i = 0; i < NLUT; i = i + 1)
            sig_lut[i*W_SIG +: W_SIG] = f_sig_lut[i];
        for (i = 0; i < H; i = i + 1) begin
            d[i*W_D +: W_D] = f_d[i];
            m_c_re[i*W_M +: W_M] = f_m_c_re[i];
            m_c_im[i*W_M +: W_M] = f_m_c_im[i];
            m_d[i*W_M +: W_M] = f_m_d[i];
            r_y[i*W_R +: W_R] = f_r_y[i];
            mix_a_b[i*W_BIAS +: W_BIAS] = f_mix_a_b[i];
            mix_b_b[i*W_BIAS +: W_BIAS] = f_mix_b_b[i];
            mix_a_m[i*W_M +: W_M] = f_mix_a_m[i];
            mix_b_m[i*W_M +: W_M] = f_mix_b_m[i];
            mix_a_r[i*W_R +: W_R] = f_mix_a_r[i];
            mix_b_r[i*W_R +: W_R] = f_mix_b_r[i];
            glu_m[i*W_M +: W_M] = f_glu_m[i];
            glu_r[i*W_R +: W_R] = f_glu_r[i];
            post_m0[i*W_M +: W_M] = HAS_POST ? f_post_m0[i] : 0;
            post_m1[i*W_M +: W_M] = (HAS_POST && RESIDUAL) ? f_post_m1[i] : 0;
            post_offset[i*W_BIAS +: W_BIAS] = HAS_POST ? f_post_offset[i] : 0;
            post_sign[i*2 +: 2] = HAS_POST ? f_post_sign[i] : 2'b01;
            post_r[i*W_R +: W_R] = HAS_POST ? f_post_r[i] : 0;
        end
        fd[0] = $fopen("rtl/x_re.memh", "w");
        fd[1] = $fopen("rtl/x_im.memh", "w");
        fd[2] = $fopen("rtl/sat_x_re.memh", "w");
        fd[3] = $fopen("rtl/sat_x_im.memh", "w");
        fd[4] = $fopen("rtl/y.memh", "w");
        fd[5] = $fopen("rtl/sat_y.memh", "w");
        fd[6] = $fopen("rtl/za.memh", "w");
        fd[7] = $fopen("rtl/sat_za.memh", "w");
        fd[8] = $fopen("rtl/zb.memh", "w");
        fd[9] = $fopen("rtl/sat_zb.memh", "w");
        fd[10] = $fopen("rtl/sig.memh", "w");
        fd[11] = $fopen("rtl/act.memh", "w");
        fd[12] = $fopen("rtl/sat_act.memh", "w");
        fd[13] = $fopen("rtl/out.memh", "w");
        fd[14] = $fopen("rtl/sat_out.memh", "w");
        if (fd[14] == 0)
            $fatal(1, "tb_s4d_layer: cannot open rtl/*.memh for writing (does rtl/ exist?)");

        for (b = 0; b < NB; b = b + 1) begin
            rst = 1'b1;
            @(posedge clk);
            #1 rst = 1'b0;
            for (t = 0; t < L; t = t + 1) begin
                next_random;
                for (idle = lfsr % 3; idle > 0; idle = idle - 1)
                    @(posedge clk);
                #1;
                for (i = 0; i < H; i = i + 1)
                    u[i*W_U +: W_U] = f_u[(b*L + t)*H + i];
                in_valid = 1'b1;
                while (!in_ready) begin
                    @(posedge clk);
                    #1;
                end
                @(posedge clk);  // taken: in_valid && in_ready at this edge
                #1 in_valid = 1'b0;
                u = {H*W_U{1'bx}};  // the layer must have taken its copy
                while (!out_valid) begin
                    @(posedge clk);
                    #1;
                end
                next_random;
                for (idle = lfsr % 3; idle > 0; idle = idle - 1)
                    @(posedge clk);  // out_valid must hold its words while out_ready is low
                #1;
                if (!out_valid)
                    $fatal(1, "tb_s4d_layer: out_valid dropped before out_ready");
                dump;
                out_ready = 1'b1;
                @(posedge clk);
                #1 out_ready = 1'b0;
                steps = steps + 1;
            end
        end
        for (i = 0; i < 15; i = i + 1)
            $fclose(fd[i]);
        $display("tb_s4d_layer: %0d steps handed through", steps);
        $finish;
    end
endmodule
