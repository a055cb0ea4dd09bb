"""Low-rank family: attention approximations and factorized Linear layers."""
