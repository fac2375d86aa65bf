// One weight bank with its matrix-vector unit (reference RTL of mmf fpga-image; Verilog-2001).
//
// A bank is a WORD_BITS x BANK_WORDS memory initialised from one .mem file of the image
// (`$readmemh`, as Vivado, Quartus, Yosys, Icarus and Verilator accept); it infers block RAM
// or UltraRAM. The activation buffer is written by the host through x_we/x_waddr/x_wdata, one
// word of WORD_BITS/2 int8 values at a time. Every width and depth is a parameter: set them from
// the image's generated header mmf_image.vh (MMF_WORD_BITS, MMF_BANK_WORDS, MMF_BANK_ADDR_BITS,
// <tensor>_WORDS_PER_ROW, ...), so no design hard-codes the image.
module ternary_mvu_rom #(
    parameter WIDTH = 64,
    parameter DEPTH = 4096,
    parameter ADDR_BITS = 12,
    parameter INIT_FILE = ""
) (
    input  wire                 clk,
    input  wire                 en,
    input  wire [ADDR_BITS-1:0] addr,
    output reg  [WIDTH-1:0]     dout
);
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    initial begin
        if (INIT_FILE != "") $readmemh(INIT_FILE, mem);
    end
    always @(posedge clk) begin
        if (en) dout <= mem[addr];
    end
endmodule

module ternary_mvu_bank #(
    parameter WORD_BITS = 64,
    parameter BANK_WORDS = 4096,
    parameter ADDR_BITS = 12,
    parameter XDEPTH = 1024,        // activation buffer depth in words (>= words per row)
    parameter XADDR_BITS = 10,
    parameter ROW_BITS = 16,
    parameter INIT_FILE = ""
) (
    input  wire                       clk,
    input  wire                       rst,
    // activation buffer write port
    input  wire                       x_we,
    input  wire [XADDR_BITS-1:0]      x_waddr,
    input  wire [4*WORD_BITS-1:0]     x_wdata,
    // control
    input  wire                       start,
    input  wire [ADDR_BITS-1:0]       base_addr,
    input  wire [ROW_BITS-1:0]        num_rows,
    input  wire [XADDR_BITS-1:0]      words_per_row,
    // results
    output wire                       out_valid,
    output wire [ROW_BITS-1:0]        out_row,
    output wire signed [31:0]         out_acc,
    output wire                       busy,
    output wire                       done,
    output wire                       bad_code
);
    wire                    w_en;
    wire [ADDR_BITS-1:0]    w_addr;
    wire [WORD_BITS-1:0]    w_data;
    wire [XADDR_BITS-1:0]   x_raddr;
    reg  [4*WORD_BITS-1:0]  x_data;
    reg  [4*WORD_BITS-1:0]  xmem [0:XDEPTH-1];

    always @(posedge clk) begin
        if (x_we) xmem[x_waddr] <= x_wdata;
        if (w_en) x_data <= xmem[x_raddr];
    end

    ternary_mvu_rom #(.WIDTH(WORD_BITS), .DEPTH(BANK_WORDS), .ADDR_BITS(ADDR_BITS), .INIT_FILE(INIT_FILE)) rom (
        .clk(clk), .en(w_en), .addr(w_addr), .dout(w_data));

    ternary_mvu #(.WORD_BITS(WORD_BITS), .ADDR_BITS(ADDR_BITS), .XADDR_BITS(XADDR_BITS), .ROW_BITS(ROW_BITS),
                  .ACC_BITS(32)) mvu (
        .clk(clk), .rst(rst), .start(start), .base_addr(base_addr), .num_rows(num_rows),
        .words_per_row(words_per_row), .w_en(w_en), .w_addr(w_addr), .w_data(w_data),
        .x_addr(x_raddr), .x_data(x_data), .out_valid(out_valid), .out_row(out_row), .out_acc(out_acc),
        .busy(busy), .done(done), .bad_code(bad_code));
endmodule
