// s4d_layer: one whole S4D block of the integer model (docs/integer_spec.md, spec version 2, section 5.2):
// SSM core (s4d_ssm_core), mixing Linear H -> 2H (za, zb), sigmoid table, GLU, and the post op
// (folded BatchNorm and/or residual; or out = act when HAS_POST = 0).
//
// One time step per handshake: the step's u is taken on a clock edge with in_valid && in_ready;
// the core registers x and y on that edge, the rest of the block is computed from them in the
// next cycle and registered with out_valid, held until out_valid && out_ready. in_ready is high
// when nothing is in flight (a reference, not a throughput design: 2 cycles per step at best).
// `rst` (synchronous) clears the state (x_{-1} = 0) and the handshake.
//
// Buses are flat, word i at [i*W +: W]: mixing weights (h, o) are word h*H + o (row-major
// (H, H), as the bundle's mix_a_W), sig_lut entry j = zb - ZB_MIN, per-channel words h.
// Multipliers are W_M-bit non-negative words, biases and offsets W_BIAS-bit signed, post_sign
// 2-bit signed (+1 = 01, -1 = 11). Every accumulator holds its exact value; rounding and
// saturation are s4d_rne_sat (validation/rtl/s4d_ssm_core.v). Plain Verilog-2005.
`timescale 1ns / 1ps
module s4d_layer #(
    parameter integer H = 1,
    parameter integer N2 = 1,
    parameter integer W_U = 16,
    parameter integer W_A = 8,
    parameter integer W_B = 8,
    parameter integer W_C = 8,
    parameter integer W_D = 8,
    parameter integer W_X = 16,
    parameter integer W_Y = 16,
    parameter integer X_MIN = -32768,
    parameter integer X_MAX = 32767,
    parameter integer Y_MIN = -32768,
    parameter integer Y_MAX = 32767,
    parameter integer W_W = 8,          // mixing weights
    parameter integer W_ZA = 16,
    parameter integer ZA_MIN = -32768,
    parameter integer ZA_MAX = 32767,
    parameter integer W_ZB = 12,
    parameter integer ZB_MIN = -2048,
    parameter integer ZB_MAX = 2047,
    parameter integer W_SIG = 21,       // sigmoid table words: 0 .. 2**(W_SIG-1), unsigned
    parameter integer W_ACT = 8,
    parameter integer ACT_MIN = -127,
    parameter integer ACT_MAX = 127,
    parameter integer HAS_POST = 1,
    parameter integer RESIDUAL = 0,
    parameter integer W_OUT = 16,
    parameter integer OUT_MIN = -32768,
    parameter integer OUT_MAX = 32767,
    parameter integer W_M = 64,
    parameter integer W_R = 8,
    parameter integer W_BIAS = 64
) (
    input  wire                   clk,
    input  wire                   rst,
    input  wire                   in_valid,
    output wire                   in_ready,
    input  wire [H*W_U-1:0]       u,
    // SSM core words (s4d_ssm_core)
    input  wire [H*N2*W_A-1:0]    abar_re,
    input  wire [H*N2*W_A-1:0]    abar_im,
    input  wire [H*N2*W_B-1:0]    bbar_re,
    input  wire [H*N2*W_B-1:0]    bbar_im,
    input  wire [H*N2*W_C-1:0]    c_re,
    input  wire [H*N2*W_C-1:0]    c_im,
    input  wire [H*W_D-1:0]       d,
    input  wire [H*N2*W_M-1:0]    m_a_re,
    input  wire [H*N2*W_M-1:0]    m_a_im_to_re,
    input  wire [H*N2*W_M-1:0]    m_a_im_to_im,
    input  wire [H*N2*W_M-1:0]    m_b_re,
    input  wire [H*N2*W_M-1:0]    m_b_im,
    input  wire [H*N2*W_R-1:0]    r_x,
    input  wire [H*W_M-1:0]       m_c_re,
    input  wire [H*W_M-1:0]       m_c_im,
    input  wire [H*W_M-1:0]       m_d,
    input  wire [H*W_R-1:0]       r_y,
    // mixing, gate, GLU, post
    input  wire [H*H*W_W-1:0]     mix_a_w,
    input  wire [H*W_BIAS-1:0]    mix_a_b,
    input  wire [H*W_M-1:0]       mix_a_m,
    input  wire [H*W_R-1:0]       mix_a_r,
    input  wire [H*H*W_W-1:0]     mix_b_w,
    input  wire [H*W_BIAS-1:0]    mix_b_b,
    input  wire [H*W_M-1:0]       mix_b_m,
    input  wire [H*W_R-1:0]       mix_b_r,
    input  wire [(ZB_MAX-ZB_MIN+1)*W_SIG-1:0] sig_lut,
    input  wire [H*W_M-1:0]       glu_m,
    input  wire [H*W_R-1:0]       glu_r,
    input  wire [H*W_M-1:0]       post_m0,
    input  wire [H*W_M-1:0]       post_m1,
    input  wire [H*W_BIAS-1:0]    post_offset,
    input  wire [H*2-1:0]         post_sign,
    input  wire [H*W_R-1:0]       post_r,
    // outputs of the step, registered, valid with out_valid
    output reg                    out_valid,
    input  wire                   out_ready,
    output wire [H*N2*W_X-1:0]    x_re,
    output wire [H*N2*W_X-1:0]    x_im,
    output wire [H*W_Y-1:0]       y,
    output wire [H*N2-1:0]        sat_x_re,
    output wire [H*N2-1:0]        sat_x_im,
    output wire [H-1:0]           sat_y,
    output reg  [H*W_ZA-1:0]      za,
    output reg  [H*W_ZB-1:0]      zb,
    output reg  [H*W_SIG-1:0]     sig,
    output reg  [H*W_ACT-1:0]     act,
    output reg  [H*W_OUT-1:0]     out,
    output reg  [H-1:0]           sat_za,
    output reg  [H-1:0]           sat_zb,
    output reg  [H-1:0]           sat_act,
    output reg  [H-1:0]           sat_out
);
    function integer clog2;  // elaboration-time only
        input integer value;
        integer v;
        begin
            clog2 = 0;
            for (v = value - 1; v > 0; v = v >> 1)
                clog2 = clog2 + 1;
        end
    endfunction

    localparam integer W_MIXS = W_W + W_Y + clog2(H) + 1;                 // sum_h W * y
    localparam integer W_MIXACC = (W_MIXS > W_BIAS ? W_MIXS : W_BIAS) + 1; // + bias
    localparam integer W_MIXP = W_M + W_MIXACC;                             // M * acc
    localparam integer W_PROD = W_ZA + W_SIG + 1;                           // za * sig
    localparam integer W_GLUP = W_M + W_PROD;
    localparam integer W_PT = W_M + (W_ACT > W_U ? W_ACT : W_U) + 1;       // M * act, M * u
    localparam integer W_POSTACC = (W_PT + 1 > W_BIAS ? W_PT + 1 : W_BIAS) + 2;

    reg s1;  // the core's registers hold a new step: compute the rest of the block
    reg [H*W_U-1:0] u_reg;
    wire fire = in_valid && in_ready;
    assign in_ready = !s1 && (!out_valid || out_ready);

    wire valid_core;
    s4d_ssm_core #(.H(H), .N2(N2), .W_U(W_U), .W_A(W_A), .W_B(W_B), .W_C(W_C), .W_D(W_D),
                   .W_X(W_X), .W_Y(W_Y), .W_M(W_M), .W_R(W_R),
                   .X_MIN(X_MIN), .X_MAX(X_MAX), .Y_MIN(Y_MIN), .Y_MAX(Y_MAX)) core (
        .clk(clk), .rst(rst), .step(fire), .u(u),
        .abar_re(abar_re), .abar_im(abar_im), .bbar_re(bbar_re), .bbar_im(bbar_im),
        .c_re(c_re), .c_im(c_im), .d(d),
        .m_a_re(m_a_re), .m_a_im_to_re(m_a_im_to_re), .m_a_im_to_im(m_a_im_to_im),
        .m_b_re(m_b_re), .m_b_im(m_b_im), .r_x(r_x),
        .m_c_re(m_c_re), .m_c_im(m_c_im), .m_d(m_d), .r_y(r_y),
        .x_re(x_re), .x_im(x_im), .y(y), .sat_x_re(sat_x_re), .sat_x_im(sat_x_im),
        .sat_y(sat_y), .valid(valid_core));

    wire [H*W_ZA-1:0] za_next;
    wire [H*W_ZB-1:0] zb_next;
    wire [H*W_SIG-1:0] sig_next;
    wire [H*W_ACT-1:0] act_next;
    wire [H*W_OUT-1:0] out_next;
    wire [H-1:0] sat_za_next, sat_zb_next, sat_act_next, sat_out_next;

    genvar o, h;
    generate
        for (o = 0; o < H; o = o + 1) begin : chan
            // mixing: running sums over the inputs h of W[h, o] * y[h]
            wire [(H+1)*W_MIXS-1:0] sum_a, sum_b;
            assign sum_a[0 +: W_MIXS] = {W_MIXS{1'b0}};
            assign sum_b[0 +: W_MIXS] = {W_MIXS{1'b0}};
            for (h = 0; h < H; h = h + 1) begin : term
                wire signed [W_Y-1:0] y_h = y[h*W_Y +: W_Y];
                wire signed [W_W-1:0] wa = mix_a_w[(h*H + o)*W_W +: W_W];
                wire signed [W_W-1:0] wb = mix_b_w[(h*H + o)*W_W +: W_W];
                wire signed [W_MIXS-1:0] pa = wa * y_h;
                wire signed [W_MIXS-1:0] pb = wb * y_h;
                assign sum_a[(h+1)*W_MIXS +: W_MIXS] = sum_a[h*W_MIXS +: W_MIXS] + pa;
                assign sum_b[(h+1)*W_MIXS +: W_MIXS] = sum_b[h*W_MIXS +: W_MIXS] + pb;
            end
            wire signed [W_MIXS-1:0] s_a = sum_a[H*W_MIXS +: W_MIXS];
            wire signed [W_MIXS-1:0] s_b = sum_b[H*W_MIXS +: W_MIXS];
            wire signed [W_BIAS-1:0] b_a = mix_a_b[o*W_BIAS +: W_BIAS];
            wire signed [W_BIAS-1:0] b_b = mix_b_b[o*W_BIAS +: W_BIAS];
            wire signed [W_M-1:0] m_a = mix_a_m[o*W_M +: W_M];
            wire signed [W_M-1:0] m_b = mix_b_m[o*W_M +: W_M];
            wire signed [W_MIXACC-1:0] acc_a = s_a + b_a;
            wire signed [W_MIXACC-1:0] acc_b = s_b + b_b;
            wire signed [W_MIXP-1:0] p_a = m_a * acc_a;
            wire signed [W_MIXP-1:0] p_b = m_b * acc_b;
            wire signed [W_ZA-1:0] za_o;
            wire signed [W_ZB-1:0] zb_o;
            s4d_rne_sat #(.W_IN(W_MIXP), .W_R(W_R), .W_OUT(W_ZA), .QMIN(ZA_MIN), .QMAX(ZA_MAX))
                q_za (.acc(p_a), .shift(mix_a_r[o*W_R +: W_R]), .q(za_o), .sat(sat_za_next[o]));
            s4d_rne_sat #(.W_IN(W_MIXP), .W_R(W_R), .W_OUT(W_ZB), .QMIN(ZB_MIN), .QMAX(ZB_MAX))
                q_zb (.acc(p_b), .shift(mix_b_r[o*W_R +: W_R]), .q(zb_o), .sat(sat_zb_next[o]));
            assign za_next[o*W_ZA +: W_ZA] = za_o;
            assign zb_next[o*W_ZB +: W_ZB] = zb_o;

            // gate: sig = sig_lut[zb - ZB_MIN]; GLU: act = sat(RNE(m_g * za * sig / 2**r_g))
            wire [31:0] idx = zb_o - ZB_MIN;
            wire [W_SIG-1:0] sig_o = sig_lut[idx*W_SIG +: W_SIG];
            wire signed [W_SIG:0] sig_s = {1'b0, sig_o};
            wire signed [W_PROD-1:0] prod = za_o * sig_s;
            wire signed [W_M-1:0] m_g = glu_m[o*W_M +: W_M];
            wire signed [W_GLUP-1:0] p_g = m_g * prod;
            wire signed [W_ACT-1:0] act_o;
            s4d_rne_sat #(.W_IN(W_GLUP), .W_R(W_R), .W_OUT(W_ACT), .QMIN(ACT_MIN), .QMAX(ACT_MAX))
                q_act (.acc(p_g), .shift(glu_r[o*W_R +: W_R]), .q(act_o), .sat(sat_act_next[o]));
            assign sig_next[o*W_SIG +: W_SIG] = sig_o;
            assign act_next[o*W_ACT +: W_ACT] = act_o;

            // post: out = sat(RNE((sign * (m0 * act + m1 * u) + offset) / 2**r_p)), or act itself
            if (HAS_POST) begin : post
                wire signed [W_M-1:0] m0 = post_m0[o*W_M +: W_M];
                wire signed [W_M-1:0] m1 = post_m1[o*W_M +: W_M];
                wire signed [W_U-1:0] u_o = u_reg[o*W_U +: W_U];
                wire signed [W_PT-1:0] t0 = m0 * act_o;
                wire signed [W_PT-1:0] zero_t = 0;
                wire signed [W_PT-1:0] t1 = RESIDUAL ? m1 * u_o : zero_t;  // both arms signed
                wire signed [W_POSTACC-1:0] s = t0 + t1;
                wire negative = post_sign[o*2 + 1];
                wire signed [W_BIAS-1:0] off = post_offset[o*W_BIAS +: W_BIAS];
                wire signed [W_POSTACC-1:0] acc = (negative ? -s : s) + off;
                wire signed [W_OUT-1:0] out_o;
                s4d_rne_sat #(.W_IN(W_POSTACC), .W_R(W_R), .W_OUT(W_OUT), .QMIN(OUT_MIN), .QMAX(OUT_MAX))
                    q_out (.acc(acc), .shift(post_r[o*W_R +: W_R]), .q(out_o), .sat(sat_out_next[o]));
                assign out_next[o*W_OUT +: W_OUT] = out_o;
            end else begin : no_post
                wire signed [W_OUT-1:0] out_o = act_o;
                assign out_next[o*W_OUT +: W_OUT] = out_o;
                assign sat_out_next[o] = 1'b0;
            end
        end
    endgenerate

    always @(posedge clk) begin
        if (rst) begin
            s1 <= 1'b0;
            out_valid <= 1'b0;
        end else begin
            s1 <= fire;
            if (fire)
                u_reg <= u;
            if (s1) begin
                out_valid <= 1'b1;
                za <= za_next;
                zb <= zb_next;
                sig <= sig_next;
                act <= act_next;
                out <= out_next;
                sat_za <= sat_za_next;
                sat_zb <= sat_zb_next;
                sat_act <= sat_act_next;
                sat_out <= sat_out_next;
            end else if (out_ready) begin
                out_valid <= 1'b0;
            end
        end
    end
endmodule
