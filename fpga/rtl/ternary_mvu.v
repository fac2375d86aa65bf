// Ternary matrix-vector unit (reference RTL of mmf fpga-image; synthesizable Verilog-2001).
//
// Computes, for rows r = 0 .. num_rows-1 of a ternary weight matrix held in a word memory,
//     acc[r] = sum_k w[r][k] * x[k]      w in {-1, 0, +1}, x int8, acc int32
// with additions and subtractions only: no multiplier is inferred.
//
// Weight memory layout (docs/fpga.md, "ternary region"): one row occupies words_per_row
// consecutive words starting at base_addr + r * words_per_row; within a word, lane e (bits
// [2e+1:2e]) holds the code of column k = j * LANES + e, where j is the word's index in its row.
// Codes: 2'b00 = -1, 2'b01 = 0, 2'b10 = +1, 2'b11 = reserved (read as 0 and flagged in bad_code).
// Activation memory: word j holds x[j*LANES + e] in bits [8e+7:8e] (two's complement).
//
// Both memories are read with one cycle of latency (registered block-RAM output), so the unit
// streams one weight word per clock: a row of K columns takes ceil(K / LANES) cycles.
// The LANES-input adder is one combinational sum per cycle; for wide words at high clock rates
// a production design would pipeline it (the results are the same).
module ternary_mvu #(
    parameter WORD_BITS = 64,          // weight word width, a multiple of 2
    parameter ADDR_BITS = 16,          // weight memory address width
    parameter XADDR_BITS = 10,         // activation memory address width (words per row)
    parameter ROW_BITS = 16,           // row counter width
    parameter ACC_BITS = 32            // accumulator width (int32)
) (
    input  wire                          clk,
    input  wire                          rst,            // synchronous, active high
    input  wire                          start,          // pulse: begin a pass (ignored while busy)
    input  wire [ADDR_BITS-1:0]          base_addr,      // word address of row 0
    input  wire [ROW_BITS-1:0]           num_rows,       // rows to compute, >= 1
    input  wire [XADDR_BITS-1:0]         words_per_row,  // words per row, >= 1
    // weight memory read port (data valid one cycle after w_en)
    output wire                          w_en,
    output wire [ADDR_BITS-1:0]          w_addr,
    input  wire [WORD_BITS-1:0]          w_data,
    // activation memory read port (data valid one cycle after w_en)
    output wire [XADDR_BITS-1:0]         x_addr,
    input  wire [4*WORD_BITS-1:0]        x_data,         // LANES int8 activations
    // results: one accumulator per row, in row order
    output reg                           out_valid,
    output reg  [ROW_BITS-1:0]           out_row,
    output reg  signed [ACC_BITS-1:0]    out_acc,
    output reg                           busy,
    output reg                           done,           // one-cycle pulse after the last row
    output reg                           bad_code        // sticky: a reserved code 2'b11 was read
);
    localparam LANES = WORD_BITS / 2;

    // ---------------- address generation ----------------
    reg                  issuing;
    reg [ROW_BITS-1:0]   r;
    reg [XADDR_BITS-1:0] j;
    reg [ADDR_BITS-1:0]  row_addr;
    reg [ROW_BITS-1:0]   rows_q;
    reg [XADDR_BITS-1:0] wpr_q;

    assign w_en   = issuing;
    assign w_addr = row_addr + j;
    assign x_addr = j;

    // pipeline tags travelling with the data that arrives one cycle later
    reg                  d_valid, d_last_word, d_last_row;
    reg [ROW_BITS-1:0]   d_row;

    always @(posedge clk) begin
        if (rst) begin
            issuing <= 1'b0; busy <= 1'b0; r <= 0; j <= 0; row_addr <= 0;
            rows_q <= 0; wpr_q <= 0;
            d_valid <= 1'b0; d_last_word <= 1'b0; d_last_row <= 1'b0; d_row <= 0;
        end else begin
            d_valid <= issuing;
            d_last_word <= issuing && (j == wpr_q - 1'b1);
            d_last_row <= issuing && (r == rows_q - 1'b1);
            d_row <= r;
            if (start && !busy) begin
                busy <= 1'b1; issuing <= 1'b1;
                r <= 0; j <= 0; row_addr <= base_addr;
                rows_q <= num_rows; wpr_q <= words_per_row;
            end else if (issuing) begin
                if (j == wpr_q - 1'b1) begin
                    j <= 0;
                    row_addr <= row_addr + wpr_q;
                    r <= r + 1'b1;
                    if (r == rows_q - 1'b1) issuing <= 1'b0;
                end else begin
                    j <= j + 1'b1;
                end
            end
            if (done) busy <= 1'b0;
        end
    end

    // ---------------- ternary dot product of one word: adds and subtracts only ----------------
    // Each lane contributes +x, -x or 0; a balanced adder tree (depth log2 LANES) sums the lanes.
    function integer clog2;
        input integer value;
        integer v;
        begin
            clog2 = 0;
            for (v = value - 1; v > 0; v = v >> 1) clog2 = clog2 + 1;
        end
    endfunction
    localparam LEAVES = 1 << clog2(LANES);          // lanes rounded up to a power of two
    localparam SUM_BITS = 10 + clog2(LANES);         // |sum| <= 128 * LANES, with a spare bit
    wire signed [SUM_BITS-1:0] tree [0:2*LEAVES-2];  // heap order: node i has children 2i+1, 2i+2
    wire        [LANES-1:0]    lane_bad;
    genvar g;
    generate
        for (g = 0; g < LEAVES; g = g + 1) begin : leaf
            if (g < LANES) begin : lane
                wire        [1:0]          c = w_data[2*g +: 2];
                wire signed [SUM_BITS-1:0] xv = {{(SUM_BITS-8){x_data[8*g+7]}}, x_data[8*g +: 8]};
                assign tree[LEAVES-1+g] = (c == 2'b10) ? xv : (c == 2'b00) ? -xv : {SUM_BITS{1'b0}};
                assign lane_bad[g] = &c;
            end else begin : pad
                assign tree[LEAVES-1+g] = {SUM_BITS{1'b0}};
            end
        end
        for (g = 0; g < LEAVES - 1; g = g + 1) begin : node
            assign tree[g] = tree[2*g+1] + tree[2*g+2];
        end
    endgenerate
    wire signed [SUM_BITS-1:0] word_sum = tree[0];
    wire                       word_bad = |lane_bad;

    // ---------------- accumulation ----------------
    reg signed [ACC_BITS-1:0] acc;
    wire signed [ACC_BITS-1:0] acc_next = acc + word_sum;

    always @(posedge clk) begin
        if (rst) begin
            acc <= 0; out_valid <= 1'b0; out_row <= 0; out_acc <= 0; done <= 1'b0; bad_code <= 1'b0;
        end else begin
            out_valid <= 1'b0;
            done <= 1'b0;
            if (start && !busy) bad_code <= 1'b0;
            if (d_valid) begin
                if (word_bad) bad_code <= 1'b1;
                if (d_last_word) begin
                    out_valid <= 1'b1;
                    out_row <= d_row;
                    out_acc <= acc_next;
                    acc <= 0;
                    if (d_last_row) done <= 1'b1;
                end else begin
                    acc <= acc_next;
                end
            end
        end
    end
endmodule
