"""Released checkpoints of the three prior families, loaded as the project's own priors and tokenizers.

A release is a prior together with the first stage it was trained on. Its loader reads the files as their authors
distribute them, checks every key and shape against the release's own config before building anything (a wrong
or truncated file is a one-line error naming the file and the first mismatching key), and maps the weights onto
the project's modules, so a released model runs through the same sampler, NLL and completion code as a prior
trained here. tools/release_fixtures.py makes parity fixtures with the official code; tests/ check each loader's
outputs against them.
"""
