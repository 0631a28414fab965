"""Many runs in one program: the members of a sweep (`config.sweep`) train
together, their parameters, optimiser states, BatchNorm statistics,
averages and keys stacked on a leading member axis and one jitted step
`vmap`-ed over it (`step`); each member writes a complete run directory of
its own, WORKDIR/members/<k>/ (`training`)."""
