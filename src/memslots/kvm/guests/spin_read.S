/*
 * spin_read.S: the spinning-reader guest (16-bit real mode, GNU as syntax).
 *
 * Loops: read the 32-bit value at DS:SI, report it with `out 0x11, eax`, then ask the
 * host whether to stop with `in al, 0x12`: 0 means read again, anything else halts.
 * The host therefore sees every value the guest read, in order; a read of a gpa that no
 * memslot backs arrives first as an MMIO exit (4-byte read) whose answer is what the
 * guest then reports.
 *
 * Inputs (set by the host before the run; KvmVcpu.setup_real_mode does it):
 *   DS = segment whose base is the page to read. The code never reloads DS, so the
 *        host may give it any base below 4 GiB in the hidden part of the register
 *        (e.g. 0xc0000000, the selftests' MEM_REGION_GPA).
 *   SI = offset of the value inside that segment
 * Output: per iteration one OUT of 4 bytes to port 0x11 (the value) and one IN of 1 byte
 * from port 0x12 (the host's stop flag); HLT once the host answers non-zero.
 *
 * The bytes are committed in __init__.py (SPIN_READER). To regenerate them:
 *   as -o spin_read.o spin_read.S && objcopy -O binary -j .text spin_read.o spin_read.bin
 *   python3 -c "print(open('spin_read.bin','rb').read().hex())"
 */
        .intel_syntax noprefix
        .code16
        .text
        .globl  spin_reader
spin_reader:
        mov     eax, [si]               /* the value under test */
        out     0x11, eax               /* report it */
        in      al, 0x12                /* host: 0 = go on, else stop */
        test    al, al
        jz      spin_reader
        hlt
