"""memslots: Linux KVM's tree-based memory slots, in Python."""
