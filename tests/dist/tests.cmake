# Multi-rank test groups: each runs the tests with the given Catch2 tags under mpirun at 2 and 3 ranks.
lockstep_add_mpi_test(NAME dist.comm TARGET lockstep_dist_tests NP 2 3 ARGS "[comm]")
lockstep_add_mpi_test(NAME dist.runtime TARGET lockstep_dist_tests NP 2 3 ARGS "[runtime]")
lockstep_add_mpi_test(NAME dist.ddp TARGET lockstep_dist_tests NP 2 3 ARGS "[ddp]")
lockstep_add_mpi_test(NAME dist.train TARGET lockstep_dist_tests NP 2 3 ARGS "[train]" TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.compress TARGET lockstep_dist_tests NP 2 3 ARGS "[compress]" TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.precision TARGET lockstep_dist_tests NP 2 3 ARGS "[precision]" TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.syncbn TARGET lockstep_dist_tests NP 2 3 ARGS "[syncbn]" TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.quant TARGET lockstep_dist_tests NP 2 3 ARGS "[quant]" TIMEOUT 300)
