"""Media I/O shared by every stage: probing, frame reading, audio decode/resample, atomic file writes.
Argument lists only, never a shell."""
