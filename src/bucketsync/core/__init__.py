"""The core: plain records, the one error hierarchy, and pure decisions (diff, gate, keys). No I/O."""
