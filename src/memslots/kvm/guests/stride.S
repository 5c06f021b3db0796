/*
 * stride.S: the stride-writing guest (16-bit real mode with 32-bit addresses, GNU as
 * syntax).
 *
 * Writes the 16-bit word AX + k at ES:[EDI + k * EBX] for k = 0 .. ECX-1, then reports
 * the number of writes with `out 0x10, eax` and halts. EDI and EBX are 32-bit, so with
 * the 4 GiB segment limits of big real mode (KvmVcpu.setup_real_mode(big_real_mode=True))
 * and ES base 0 it reaches every gpa below 4 GiB: a 2^20-page slot, a thousand slots.
 * EBX is added modulo 2^32: 0 writes one page again and again, -4096 walks downwards.
 *
 * Two entry points:
 *   offset 0               stride_writer: no exit until the report; 5 instructions per
 *                          write (KVM's emulator here runs 1024 instructions per batch,
 *                          so about 205 writes happen between two request checks);
 *   STRIDE_EXITING_ENTRY   stride_writer_exiting: also `out 0x13, ax` after each write,
 *                          so KVM returns to userspace (and checks its requests, such as
 *                          a soft-full dirty ring) after every write.
 *
 * Inputs (set by the host before the run): ES base 0 (limit 4 GiB), EDI = gpa of the
 * first write, EBX = distance between writes in bytes, AX = the first word, ECX = number
 * of writes (0 writes nothing), BP = 0 to report at the end, else halt right away.
 * Output: with the exiting entry one OUT of 2 bytes to port 0x13 (the word) per write;
 * then (BP = 0) one OUT of 4 bytes to port 0x10 (the number of writes), then HLT.
 *
 * The bytes are committed in __init__.py (STRIDE_WRITER). To regenerate them:
 *   as -o stride.o stride.S && objcopy -O binary -j .text stride.o stride.bin
 *   python3 -c "print(open('stride.bin','rb').read().hex())"
 * (tests/test_kvm_abi.py re-assembles and compares when `as` and `objcopy` exist).
 */
        .intel_syntax noprefix
        .code16
        .text
        .globl  stride_writer
stride_writer:
        xor     edx, edx                /* writes done */
        jecxz   done
1:
        mov     es:[edi], ax            /* the write */
        inc     ax
        inc     edx
        add     edi, ebx
        addr32 loop 1b
done:
        test    bp, bp                  /* BP != 0: halt without the report */
        jnz     1f
        mov     eax, edx
        out     0x10, eax               /* report: writes done */
1:
        hlt

        .globl  stride_writer_exiting
stride_writer_exiting:
        xor     edx, edx
        jecxz   done
2:
        mov     es:[edi], ax
        out     0x13, ax                /* an exit to userspace after each write */
        inc     ax
        inc     edx
        add     edi, ebx
        addr32 loop 2b
        jmp     done
