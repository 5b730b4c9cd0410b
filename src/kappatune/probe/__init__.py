"""The probe: Fisher information in the weights against kappa, as a library."""
