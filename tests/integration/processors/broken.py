"""A user module that fails while importing."""

raise RuntimeError("the processor module is broken on purpose")
