"""Tools the tool pool executes: a registry of tool sets, BFCL's executable environments, plain Python functions."""
