// s4d_ssm_core: one S4D layer's integer SSM core (docs/integer_spec.md, spec version 2).
//
// Whole vectors per clock: on a clock edge with `step` high every channel h and
// mode n advance one time step,
//   x_re' = sat_x(RNE((M_a_re*a_re*x_re - M_a_im_to_re*a_im*x_im + M_b_re*b_re*u) / 2^r_x))
//   x_im' = sat_x(RNE((M_a_re*a_re*x_im + M_a_im_to_im*a_im*x_re + M_b_im*b_im*u) / 2^r_x))
//   y     = sat_y(RNE((M_c_re*sum_n c_re*x_re' - M_c_im*sum_n c_im*x_im' + M_d*d*u) / 2^r_y))
// and the new state, y and the saturation flags are registered. `rst` (synchronous)
// clears the state: x_{-1} = 0 at the start of every sequence.
//
// Buses are flat, word i at [i*W +: W]; (h, n) is word h*N2 + n, channel h is word h.
// Every accumulator is wide enough to hold its exact value, so no intermediate wraps.
// Plain Verilog-2005: no `real`, no system functions, synthesizable.
`timescale 1ns / 1ps
module s4d_ssm_core #(
    parameter integer H = 1,
    parameter integer N2 = 1,
    parameter integer W_U = 8,
    parameter integer W_A = 8,
    parameter integer W_B = 8,
    parameter integer W_C = 8,
    parameter integer W_D = 8,
    parameter integer W_X = 16,
    parameter integer W_Y = 16,
    parameter integer W_M = 64,   // multipliers: non-negative, < 2^63
    parameter integer W_R = 8,    // shifts: 0..62
    parameter integer X_MIN = -32768,
    parameter integer X_MAX = 32767,
    parameter integer Y_MIN = -32768,
    parameter integer Y_MAX = 32767
) (
    input  wire                  clk,
    input  wire                  rst,
    input  wire                  step,
    input  wire [H*W_U-1:0]      u,
    input  wire [H*N2*W_A-1:0]   abar_re,
    input  wire [H*N2*W_A-1:0]   abar_im,
    input  wire [H*N2*W_B-1:0]   bbar_re,
    input  wire [H*N2*W_B-1:0]   bbar_im,
    input  wire [H*N2*W_C-1:0]   c_re,
    input  wire [H*N2*W_C-1:0]   c_im,
    input  wire [H*W_D-1:0]      d,
    input  wire [H*N2*W_M-1:0]   m_a_re,
    input  wire [H*N2*W_M-1:0]   m_a_im_to_re,
    input  wire [H*N2*W_M-1:0]   m_a_im_to_im,
    input  wire [H*N2*W_M-1:0]   m_b_re,
    input  wire [H*N2*W_M-1:0]   m_b_im,
    input  wire [H*N2*W_R-1:0]   r_x,
    input  wire [H*W_M-1:0]      m_c_re,
    input  wire [H*W_M-1:0]      m_c_im,
    input  wire [H*W_M-1:0]      m_d,
    input  wire [H*W_R-1:0]      r_y,
    output reg  [H*N2*W_X-1:0]   x_re,
    output reg  [H*N2*W_X-1:0]   x_im,
    output reg  [H*W_Y-1:0]      y,
    output reg  [H*N2-1:0]       sat_x_re,
    output reg  [H*N2-1:0]       sat_x_im,
    output reg  [H-1:0]          sat_y,
    output reg                   valid
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

    localparam integer WP_A = W_A + W_X;                        // a * x
    localparam integer WP_B = W_B + W_U;                        // b * u
    localparam integer W_ACC_X = (WP_A > WP_B ? WP_A : WP_B) + W_M + 2;
    localparam integer W_S = W_C + W_X + clog2(N2) + 1;         // sum_n c * x'
    localparam integer WP_D = W_D + W_U;                        // d * u
    localparam integer W_ACC_Y = (W_S > WP_D ? W_S : WP_D) + W_M + 2;

    wire [H*N2*W_X-1:0] x_re_next, x_im_next;
    wire [H*W_Y-1:0]    y_next;
    wire [H*N2-1:0]     sat_re_next, sat_im_next;
    wire [H-1:0]        sat_y_next;

    genvar h, n;
    generate
        for (h = 0; h < H; h = h + 1) begin : chan
            wire signed [W_U-1:0] u_h = u[h*W_U +: W_U];
            // running sums of c * x' over the modes, slice k = sum of modes < k
            wire [(N2+1)*W_S-1:0] sum_re, sum_im;
            assign sum_re[0 +: W_S] = {W_S{1'b0}};
            assign sum_im[0 +: W_S] = {W_S{1'b0}};

            for (n = 0; n < N2; n = n + 1) begin : mode
                localparam integer I = h*N2 + n;
                wire signed [W_A-1:0] a_re = abar_re[I*W_A +: W_A];
                wire signed [W_A-1:0] a_im = abar_im[I*W_A +: W_A];
                wire signed [W_B-1:0] b_re = bbar_re[I*W_B +: W_B];
                wire signed [W_B-1:0] b_im = bbar_im[I*W_B +: W_B];
                wire signed [W_X-1:0] xr = x_re[I*W_X +: W_X];
                wire signed [W_X-1:0] xi = x_im[I*W_X +: W_X];
                wire signed [W_M-1:0] ma_re = m_a_re[I*W_M +: W_M];
                wire signed [W_M-1:0] ma_im_re = m_a_im_to_re[I*W_M +: W_M];
                wire signed [W_M-1:0] ma_im_im = m_a_im_to_im[I*W_M +: W_M];
                wire signed [W_M-1:0] mb_re = m_b_re[I*W_M +: W_M];
                wire signed [W_M-1:0] mb_im = m_b_im[I*W_M +: W_M];
                // all operands signed and extended to W_ACC_X before multiplying: exact
                wire signed [W_ACC_X-1:0] acc_re = ma_re*a_re*xr - ma_im_re*a_im*xi + mb_re*b_re*u_h;
                wire signed [W_ACC_X-1:0] acc_im = ma_re*a_re*xi + ma_im_im*a_im*xr + mb_im*b_im*u_h;
                wire signed [W_X-1:0] xr_new, xi_new;

                s4d_rne_sat #(.W_IN(W_ACC_X), .W_R(W_R), .W_OUT(W_X), .QMIN(X_MIN), .QMAX(X_MAX))
                    q_re (.acc(acc_re), .shift(r_x[I*W_R +: W_R]), .q(xr_new), .sat(sat_re_next[I]));
                s4d_rne_sat #(.W_IN(W_ACC_X), .W_R(W_R), .W_OUT(W_X), .QMIN(X_MIN), .QMAX(X_MAX))
                    q_im (.acc(acc_im), .shift(r_x[I*W_R +: W_R]), .q(xi_new), .sat(sat_im_next[I]));
                assign x_re_next[I*W_X +: W_X] = xr_new;
                assign x_im_next[I*W_X +: W_X] = xi_new;

                wire signed [W_C-1:0] cr = c_re[I*W_C +: W_C];
                wire signed [W_C-1:0] ci = c_im[I*W_C +: W_C];
                wire signed [W_S-1:0] p_re = cr * xr_new;
                wire signed [W_S-1:0] p_im = ci * xi_new;
                // two's-complement addition is the same bits signed or unsigned
                assign sum_re[(n+1)*W_S +: W_S] = sum_re[n*W_S +: W_S] + p_re;
                assign sum_im[(n+1)*W_S +: W_S] = sum_im[n*W_S +: W_S] + p_im;
            end

            wire signed [W_S-1:0] s_re = sum_re[N2*W_S +: W_S];
            wire signed [W_S-1:0] s_im = sum_im[N2*W_S +: W_S];
            wire signed [W_D-1:0] d_h = d[h*W_D +: W_D];
            wire signed [W_M-1:0] mc_re = m_c_re[h*W_M +: W_M];
            wire signed [W_M-1:0] mc_im = m_c_im[h*W_M +: W_M];
            wire signed [W_M-1:0] md = m_d[h*W_M +: W_M];
            wire signed [W_ACC_Y-1:0] acc_y = mc_re*s_re - mc_im*s_im + md*d_h*u_h;
            wire signed [W_Y-1:0] y_new;

            s4d_rne_sat #(.W_IN(W_ACC_Y), .W_R(W_R), .W_OUT(W_Y), .QMIN(Y_MIN), .QMAX(Y_MAX))
                q_y (.acc(acc_y), .shift(r_y[h*W_R +: W_R]), .q(y_new), .sat(sat_y_next[h]));
            assign y_next[h*W_Y +: W_Y] = y_new;
        end
    endgenerate

    always @(posedge clk) begin
        if (rst) begin
            x_re <= {H*N2*W_X{1'b0}};
            x_im <= {H*N2*W_X{1'b0}};
            y <= {H*W_Y{1'b0}};
            sat_x_re <= {H*N2{1'b0}};
            sat_x_im <= {H*N2{1'b0}};
            sat_y <= {H{1'b0}};
            valid <= 1'b0;
        end else begin
            valid <= step;
            if (step) begin
                x_re <= x_re_next;
                x_im <= x_im_next;
                y <= y_next;
                sat_x_re <= sat_re_next;
                sat_x_im <= sat_im_next;
                sat_y <= sat_y_next;
            end
        end
    end
endmodule


// Round half to even of acc / 2^shift, then saturate to [QMIN, QMAX].
// floor by arithmetic shift; the remainder against one half decides the
// increment (above half: up; exactly half: up only if the floor is odd).
module s4d_rne_sat #(
    parameter integer W_IN = 64,
    parameter integer W_R = 8,
    parameter integer W_OUT = 16,
    parameter integer QMIN = -32768,
    parameter integer QMAX = 32767
) (
    input  wire signed [W_IN-1:0] acc,
    input  wire [W_R-1:0]         shift,
    output wire signed [W_OUT-1:0] q,
    output wire                   sat
);
    localparam signed [W_IN-1:0] LO = QMIN;
    localparam signed [W_IN-1:0] HI = QMAX;
    localparam [W_IN-1:0] ONE = 1;

    wire signed [W_IN-1:0] floor_q = acc >>> shift;
    wire [W_IN-1:0] rem = acc & ~({W_IN{1'b1}} << shift);
    wire [W_IN-1:0] half = (shift == 0) ? {W_IN{1'b0}} : ONE << (shift - 1);
    wire up = (shift != 0) && ((rem > half) || ((rem == half) && floor_q[0]));
    wire signed [1:0] up_s = {1'b0, up};
    wire signed [W_IN-1:0] rounded = floor_q + up_s;
    wire below = rounded < LO;
    wire above = rounded > HI;
    wire signed [W_IN-1:0] clamped = below ? LO : (above ? HI : rounded);

    assign q = clamped[W_OUT-1:0];
    assign sat = below | above;
endmodule
