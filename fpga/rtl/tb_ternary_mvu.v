// Test bench for ternary_mvu_bank (mmf fpga-image --verify runs it with Icarus Verilog).
//
// Run from a work directory holding:
//   bank0.mem .. bank<NBANKS-1>.mem  consecutive banks of the image (links to the image's .mem files)
//   act.mem       activation words (WORD_BITS/2 int8 lanes each), one per word of a row
//   expected.mem  one 32-bit two's complement accumulator per row (the torch reference)
// Plusargs: +nbanks=N +base=A +rows=R +wpr=W  (base: word address of the first row in the loaded banks)
// Writes got.mem (one accumulator per row, hex) and prints one line:
//   "MMF-MVU PASS rows=R cycles=C" or "MMF-MVU FAIL mismatches=M first_row=I got=G expected=E bad_code=B"
module tb_ternary_mvu;
    parameter WORD_BITS = 64;
    parameter BANK_WORDS = 4096;
    parameter NBANKS = 1;
    parameter ADDR_BITS = 12;
    parameter XDEPTH = 8;
    parameter XADDR_BITS = 3;
    parameter MAX_ROWS = 256;
    localparam MEM_WORDS = BANK_WORDS * NBANKS;

    reg clk = 1'b0;
    always #5 clk = ~clk;

    reg                         rst = 1'b1;
    reg                         x_we = 1'b0;
    reg  [XADDR_BITS-1:0]       x_waddr = 0;
    reg  [4*WORD_BITS-1:0]      x_wdata = 0;
    reg                         start = 1'b0;
    reg  [ADDR_BITS-1:0]        base_addr = 0;
    reg  [15:0]                 num_rows = 0;
    reg  [XADDR_BITS-1:0]       words_per_row = 0;
    wire                        out_valid, busy, done, bad_code;
    wire [15:0]                 out_row;
    wire signed [31:0]          out_acc;

    ternary_mvu_bank #(.WORD_BITS(WORD_BITS), .BANK_WORDS(MEM_WORDS), .ADDR_BITS(ADDR_BITS), .XDEPTH(XDEPTH),
                       .XADDR_BITS(XADDR_BITS), .ROW_BITS(16), .INIT_FILE("")) dut (
        .clk(clk), .rst(rst), .x_we(x_we), .x_waddr(x_waddr), .x_wdata(x_wdata), .start(start),
        .base_addr(base_addr), .num_rows(num_rows), .words_per_row(words_per_row), .out_valid(out_valid),
        .out_row(out_row), .out_acc(out_acc), .busy(busy), .done(done), .bad_code(bad_code));

    reg [4*WORD_BITS-1:0] act [0:XDEPTH-1];
    reg [31:0]            expected [0:MAX_ROWS-1];
    reg [31:0]            got [0:MAX_ROWS-1];
    reg [8*64-1:0]        fname;
    integer nbanks, base, rows, wpr, b, i, fd, mismatches, first_bad, nout, cycles;

    always @(posedge clk) begin
        if (out_valid) begin
            got[out_row] <= out_acc;
            nout <= nout + 1;
        end
    end

    initial begin
        nout = 0;
        if (!$value$plusargs("nbanks=%d", nbanks) || !$value$plusargs("base=%d", base) ||
            !$value$plusargs("rows=%d", rows) || !$value$plusargs("wpr=%d", wpr)) begin
            $display("MMF-MVU ERROR missing plusargs +nbanks +base +rows +wpr");
            $finish;
        end
        if (nbanks > NBANKS || rows > MAX_ROWS || wpr > XDEPTH || base + rows * wpr > MEM_WORDS) begin
            $display("MMF-MVU ERROR job does not fit the compiled parameters");
            $finish;
        end
        for (b = 0; b < nbanks; b = b + 1) begin
            $sformat(fname, "bank%0d.mem", b);
            $readmemh(fname, dut.rom.mem, b * BANK_WORDS, (b + 1) * BANK_WORDS - 1);
        end
        $readmemh("act.mem", act, 0, wpr - 1);
        $readmemh("expected.mem", expected, 0, rows - 1);

        repeat (2) @(posedge clk);
        rst <= 1'b0;
        // load the activation buffer through its write port
        for (i = 0; i < wpr; i = i + 1) begin
            @(posedge clk);
            x_we <= 1'b1; x_waddr <= i; x_wdata <= act[i];
        end
        @(posedge clk);
        x_we <= 1'b0;
        base_addr <= base; num_rows <= rows; words_per_row <= wpr;
        start <= 1'b1;
        @(posedge clk);
        start <= 1'b0;
        cycles = 0;
        while (!done) begin
            @(posedge clk);
            cycles = cycles + 1;
        end
        @(posedge clk);

        mismatches = 0;
        first_bad = -1;
        fd = $fopen("got.mem", "w");
        for (i = 0; i < rows; i = i + 1) begin
            $fdisplay(fd, "%h", got[i]);
            if (got[i] !== expected[i]) begin
                if (first_bad < 0) first_bad = i;
                mismatches = mismatches + 1;
            end
        end
        $fclose(fd);
        if (nout != rows) begin
            $display("MMF-MVU FAIL outputs=%0d rows=%0d", nout, rows);
        end else if (mismatches == 0 && !bad_code) begin
            $display("MMF-MVU PASS rows=%0d cycles=%0d", rows, cycles);
        end else if (mismatches == 0) begin
            $display("MMF-MVU FAIL mismatches=0 bad_code=1");
        end else begin
            $display("MMF-MVU FAIL mismatches=%0d first_row=%0d got=%0d expected=%0d bad_code=%0d", mismatches,
                     first_bad, $signed(got[first_bad]), $signed(expected[first_bad]), bad_code);
        end
        $finish;
    end
endmodule
