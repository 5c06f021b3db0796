/*
 * pattern.S: the pattern-writing guest (16-bit real mode, GNU as syntax).
 *
 * Writes one 16-bit word per 4 KiB page over CX consecutive pages, walking ES up one
 * page (0x100 paragraphs) at a time, so it reaches up to 1 MiB and crosses as many
 * memslots as the pages span. Page k (k = 0 .. CX-1) gets the word AX + k at offset DI.
 * Then it reports the number of pages written with `out 0x10, ax` and halts.
 *
 * Inputs (set by the host before the run; KvmVcpu.setup_real_mode does it):
 *   ES = segment of the first page (its gpa / 16; page-aligned gpa below 1 MiB)
 *   DI = offset of the word inside each page (0 .. 4094)
 *   AX = the first page's word
 *   CX = number of pages (0 writes nothing)
 * Output: one OUT of 2 bytes to port 0x10 carrying the page count, then HLT.
 * Cost: 6 instructions per page (about 3 us per page in KVM's emulator).
 *
 * The bytes are committed in __init__.py (PATTERN_WRITER). To regenerate them:
 *   as -o pattern.o pattern.S && objcopy -O binary -j .text pattern.o pattern.bin
 *   python3 -c "print(open('pattern.bin','rb').read().hex())"
 * (tests/test_kvm_abi.py re-assembles and compares when `as` and `objcopy` exist).
 */
        .intel_syntax noprefix
        .code16
        .text
        .globl  pattern_writer
pattern_writer:
        mov     dx, cx                  /* remember the page count for the report */
        jcxz    done                    /* zero pages: write nothing */
next_page:
        mov     es:[di], ax             /* the word for this page */
        inc     ax
        mov     bx, es
        add     bx, 0x100               /* next page: 4096 bytes = 0x100 paragraphs */
        mov     es, bx
        loop    next_page
done:
        mov     ax, dx
        out     0x10, ax                /* report: pages written */
        hlt
