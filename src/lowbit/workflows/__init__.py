"""The workflows a user calls: quantize, calibrate, prepare QAT, convert to integer modules."""
