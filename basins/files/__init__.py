"""Input and output: opening users' model and data files (:mod:`.loading`) and HDF5 reports (:mod:`.report`)."""
