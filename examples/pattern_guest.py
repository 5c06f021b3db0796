"""Run a real guest on memslots: the pattern-writing guest writes one word into each of 24
pages that span three memslots, then reports through port I/O and halts. Every memslot
call goes to /dev/kvm and is checked against the engine (KvmVm is strict by default); the
guest's writes are read back through the engine's slots and found in the dirty logs.

Run: python examples/pattern_guest.py   (needs a usable /dev/kvm)
"""

from memslots import KVM_MEM_LOG_DIRTY_PAGES as LOG_DIRTY
from memslots.dirty_log import dirty_pages
from memslots.kvm import KvmVm
from memslots.kvm.guests import PATTERN_WRITER, pattern_word, pattern_writer_args

with KvmVm() as vm:
    mem = vm.host_memory(0x40000)  # 256 KiB of guest memory, unmapped by vm.close()
    for i in range(4):  # four 64 KiB slots from gpa 0: code in slot 0, data in slots 1-3
        vm.set_user_memory_region(i, LOG_DIRTY if i else 0, i << 16, 1 << 16, mem.addr + (i << 16))
    vm.write_guest(0x1000, PATTERN_WRITER)  # the program, at gpa 0x1000
    args = pattern_writer_args(0x1C000, 24, first_word=0xA000)  # gpa 0x1c000..0x33fff
    vcpu = vm.create_vcpu(0)
    vcpu.setup_real_mode(0x1000, regs=args.regs, segments=args.segments)
    vcpu.run_until_hlt(on_io=lambda io: print(f"guest wrote {io.value} pages"), timeout=10)
    words = [vm.read_guest(0x1C000 + 0x1000 * k, 2) for k in range(24)]
    assert words == [pattern_word(0xA000, k).to_bytes(2, "little") for k in range(24)]
    for slot in (1, 2, 3):
        print(f"slot {slot}: pages {dirty_pages(vm.get_dirty_log(slot))} dirty")
    print("verified: every page holds its word, the dirty logs list exactly those pages")
