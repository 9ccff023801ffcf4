// tb_s4d_ssm_core: replays a vector directory written by qs4d_np.golden.write_ssm_vectors.
//
// Run from inside the vector directory (file names are relative). Loads the
// weights, multipliers, shifts and inputs with $readmemh, steps the core through
// every sequence (reset before each), compares x_re, x_im, y and the saturation
// flags with the expected words after every step, dumps what the RTL produced to
// rtl/<tensor>.memh (same format, for qs4d_np.golden.compare_dumps) and ends with
// $fatal on any mismatch, so the simulator's exit code fails CI.
`timescale 1ns / 1ps
module tb_s4d_ssm_core;
    parameter integer H = 1;
    parameter integer N2 = 1;
    parameter integer NB = 1;      // sequences (batch)
    parameter integer L = 1;       // steps per sequence
    parameter integer W_U = 8;
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
    parameter integer MAX_REPORT = 10;
    localparam integer W_M = 64;
    localparam integer W_R = 8;
    localparam integer HN = H * N2;

    reg clk = 1'b0;
    reg rst = 1'b1;
    reg step = 1'b0;
    always #5 clk = ~clk;

    reg [W_A-1:0] m_abar_re [0:HN-1];
    reg [W_A-1:0] m_abar_im [0:HN-1];
    reg [W_B-1:0] m_bbar_re [0:HN-1];
    reg [W_B-1:0] m_bbar_im [0:HN-1];
    reg [W_C-1:0] m_c_re_w [0:HN-1];
    reg [W_C-1:0] m_c_im_w [0:HN-1];
    reg [W_D-1:0] m_d_w [0:H-1];
    reg [W_M-1:0] m_ma_re [0:HN-1];
    reg [W_M-1:0] m_ma_im_re [0:HN-1];
    reg [W_M-1:0] m_ma_im_im [0:HN-1];
    reg [W_M-1:0] m_mb_re [0:HN-1];
    reg [W_M-1:0] m_mb_im [0:HN-1];
    reg [W_R-1:0] m_rx [0:HN-1];
    reg [W_M-1:0] m_mc_re [0:H-1];
    reg [W_M-1:0] m_mc_im [0:H-1];
    reg [W_M-1:0] m_md [0:H-1];
    reg [W_R-1:0] m_ry [0:H-1];
    reg [W_U-1:0] m_u [0:NB*L*H-1];
    reg [W_X-1:0] e_x_re [0:NB*L*HN-1];
    reg [W_X-1:0] e_x_im [0:NB*L*HN-1];
    reg [W_Y-1:0] e_y [0:NB*L*H-1];
    reg [0:0] e_sat_x_re [0:NB*L*HN-1];
    reg [0:0] e_sat_x_im [0:NB*L*HN-1];
    reg [0:0] e_sat_y [0:NB*L*H-1];

    reg [H*W_U-1:0] u;
    reg [HN*W_A-1:0] abar_re, abar_im;
    reg [HN*W_B-1:0] bbar_re, bbar_im;
    reg [HN*W_C-1:0] c_re, c_im;
    reg [H*W_D-1:0] d;
    reg [HN*W_M-1:0] m_a_re, m_a_im_to_re, m_a_im_to_im, m_b_re, m_b_im;
    reg [HN*W_R-1:0] r_x;
    reg [H*W_M-1:0] m_c_re, m_c_im, m_d;
    reg [H*W_R-1:0] r_y;
    wire [HN*W_X-1:0] x_re, x_im;
    wire [H*W_Y-1:0] y;
    wire [HN-1:0] sat_x_re, sat_x_im;
    wire [H-1:0] sat_y;
    wire valid;

    s4d_ssm_core #(.H(H), .N2(N2), .W_U(W_U), .W_A(W_A), .W_B(W_B), .W_C(W_C), .W_D(W_D),
                   .W_X(W_X), .W_Y(W_Y), .W_M(W_M), .W_R(W_R),
                   .X_MIN(X_MIN), .X_MAX(X_MAX), .Y_MIN(Y_MIN), .Y_MAX(Y_MAX)) dut (
        .clk(clk), .rst(rst), .step(step), .u(u),
        .abar_re(abar_re), .abar_im(abar_im), .bbar_re(bbar_re), .bbar_im(bbar_im),
        .c_re(c_re), .c_im(c_im), .d(d),
        .m_a_re(m_a_re), .m_a_im_to_re(m_a_im_to_re), .m_a_im_to_im(m_a_im_to_im), .m_b_re(m_b_re), .m_b_im(m_b_im), .r_x(r_x),
        .m_c_re(m_c_re), .m_c_im(m_c_im), .m_d(m_d), .r_y(r_y),
        .x_re(x_re), .x_im(x_im), .y(y), .sat_x_re(sat_x_re), .sat_x_im(sat_x_im),
        .sat_y(sat_y), .valid(valid));

    integer b, t, i, k, fd_x_re, fd_x_im, fd_y, fd_sx_re, fd_sx_im, fd_sy;
    integer passed = 0, failed = 0, words_bad = 0;
    reg step_ok;

    task report;  // one differing word
        input [8*8-1:0] tensor;
        input integer ch;
        input integer md;
        input integer expected;
        input integer got;
        begin
            words_bad = words_bad + 1;
            step_ok = 1'b0;
            if (words_bad <= MAX_REPORT)
                $display("MISMATCH %0s batch %0d step %0d channel %0d mode %0d: expected %0d, got %0d",
                         tensor, b, t, ch, md, expected, got);
        end
    endtask

    initial begin
        $readmemh("Abar_re.memh", m_abar_re);
        $readmemh("Abar_im.memh", m_abar_im);
        $readmemh("Bbar_re.memh", m_bbar_re);
        $readmemh("Bbar_im.memh", m_bbar_im);
        $readmemh("C_re.memh", m_c_re_w);
        $readmemh("C_im.memh", m_c_im_w);
        $readmemh("D.memh", m_d_w);
        $readmemh("m_a_re.memh", m_ma_re);
        $readmemh("m_a_im_to_re.memh", m_ma_im_re);
        $readmemh("m_a_im_to_im.memh", m_ma_im_im);
        $readmemh("m_b_re.memh", m_mb_re);
        $readmemh("m_b_im.memh", m_mb_im);
        $readmemh("r_x.memh", m_rx);
        $readmemh("m_c_re.memh", m_mc_re);
        $readmemh("m_c_im.memh", m_mc_im);
        $readmemh("m_d.memh", m_md);
        $readmemh("r_y.memh", m_ry);
        $readmemh("u.memh", m_u);
        $readmemh("x_re.memh", e_x_re);
        $readmemh("x_im.memh", e_x_im);
        $readmemh("y.memh", e_y);
        $readmemh("sat_x_re.memh", e_sat_x_re);
        $readmemh("sat_x_im.memh", e_sat_x_im);
        $readmemh("sat_y.memh", e_sat_y);
        for (i = 0; i < HN; i = i + 1) begin
            abar_re[i*W_A +: W_A] = m_abar_re[i];
            abar_im[i*W_A +: W_A] = m_abar_im[i];
            bbar_re[i*W_B +: W_B] = m_bbar_re[i];
            bbar_im[i*W_B +: W_B] = m_bbar_im[i];
            c_re[i*W_C +: W_C] = m_c_re_w[i];
            c_im[i*W_C +: W_C] = m_c_im_w[i];
            m_a_re[i*W_M +: W_M] = m_ma_re[i];
            m_a_im_to_re[i*W_M +: W_M] = m_ma_im_re[i];
            m_a_im_to_im[i*W_M +: W_M] = m_ma_im_im[i];
            m_b_re[i*W_M +: W_M] = m_mb_re[i];
            m_b_im[i*W_M +: W_M] = m_mb_im[i];
            r_x[i*W_R +: W_R] = m_rx[i];
        end
        for (i = 0; i < H; i = i + 1) begin
            d[i*W_D +: W_D] = m_d_w[i];
            m_c_re[i*W_M +: W_M] = m_mc_re[i];
            m_c_im[i*W_M +: W_M] = m_mc_im[i];
            m_d[i*W_M +: W_M] = m_md[i];
            r_y[i*W_R +: W_R] = m_ry[i];
        end
        fd_x_re = $fopen("rtl/x_re.memh", "w");
        fd_x_im = $fopen("rtl/x_im.memh", "w");
        fd_y = $fopen("rtl/y.memh", "w");
        fd_sx_re = $fopen("rtl/sat_x_re.memh", "w");
        fd_sx_im = $fopen("rtl/sat_x_im.memh", "w");
        fd_sy = $fopen("rtl/sat_y.memh", "w");
        if (fd_x_re == 0 || fd_y == 0 || fd_sy == 0)
            $fatal(1, "tb_s4d_ssm_core: cannot open rtl/*.memh for writing (does rtl/ exist?)");

        for (b = 0; b < NB; b = b + 1) begin
            rst = 1'b1;
            step = 1'b0;
            @(posedge clk);
            #1 rst = 1'b0;
            for (t = 0; t < L; t = t + 1) begin
                for (i = 0; i < H; i = i + 1)
                    u[i*W_U +: W_U] = m_u[(b*L + t)*H + i];
                step = 1'b1;
                @(posedge clk);
                #1 step = 1'b0;
                step_ok = 1'b1;
                for (i = 0; i < HN; i = i + 1) begin
                    k = (b*L + t)*HN + i;
                    $fwrite(fd_x_re, "%h\n", x_re[i*W_X +: W_X]);
                    $fwrite(fd_x_im, "%h\n", x_im[i*W_X +: W_X]);
                    $fwrite(fd_sx_re, "%h\n", sat_x_re[i]);
                    $fwrite(fd_sx_im, "%h\n", sat_x_im[i]);
                    if (x_re[i*W_X +: W_X] !== e_x_re[k])
                        report("x_re", i / N2, i % N2, $signed(e_x_re[k]), $signed(x_re[i*W_X +: W_X]));
                    if (x_im[i*W_X +: W_X] !== e_x_im[k])
                        report("x_im", i / N2, i % N2, $signed(e_x_im[k]), $signed(x_im[i*W_X +: W_X]));
                    if (sat_x_re[i] !== e_sat_x_re[k])
                        report("sat_x_re", i / N2, i % N2, e_sat_x_re[k], sat_x_re[i]);
                    if (sat_x_im[i] !== e_sat_x_im[k])
                        report("sat_x_im", i / N2, i % N2, e_sat_x_im[k], sat_x_im[i]);
                end
                for (i = 0; i < H; i = i + 1) begin
                    k = (b*L + t)*H + i;
                    $fwrite(fd_y, "%h\n", y[i*W_Y +: W_Y]);
                    $fwrite(fd_sy, "%h\n", sat_y[i]);
                    if (y[i*W_Y +: W_Y] !== e_y[k])
                        report("y", i, -1, $signed(e_y[k]), $signed(y[i*W_Y +: W_Y]));
                    if (sat_y[i] !== e_sat_y[k])
                        report("sat_y", i, -1, e_sat_y[k], sat_y[i]);
                end
                if (!valid)
                    report("valid", -1, -1, 1, 0);
                if (step_ok)
                    passed = passed + 1;
                else
                    failed = failed + 1;
            end
        end
        $fclose(fd_x_re);
        $fclose(fd_x_im);
        $fclose(fd_y);
        $fclose(fd_sx_re);
        $fclose(fd_sx_im);
        $fclose(fd_sy);
        $display("tb_s4d_ssm_core: %0d steps passed, %0d steps failed, %0d word mismatches",
                 passed, failed, words_bad);
        if (failed != 0)
            $fatal(1, "tb_s4d_ssm_core: RTL differs from the golden vectors");
        $finish;
    end
endmodule
