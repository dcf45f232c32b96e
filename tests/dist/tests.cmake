# Multi-rank test groups: each runs the tests with the given Catch2 tags under mpirun at 2 and 3 ranks.
# Note [No test matched]: a tag that selects no test fails the group instead of passing with none run.
lockstep_add_mpi_test(NAME dist.comm TARGET lockstep_dist_tests NP 2 3 ARGS "[comm]" --warn NoTests)
lockstep_add_mpi_test(NAME dist.runtime TARGET lockstep_dist_tests NP 2 3 ARGS "[runtime]" --warn NoTests)
lockstep_add_mpi_test(NAME dist.ddp TARGET lockstep_dist_tests NP 2 3 ARGS "[ddp]" --warn NoTests)
lockstep_add_mpi_test(NAME dist.train TARGET lockstep_dist_tests NP 2 3 ARGS "[train]" --warn NoTests TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.compress TARGET lockstep_dist_tests NP 2 3 ARGS "[compress]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.precision TARGET lockstep_dist_tests NP 2 3 ARGS "[precision]" --warn NoTests TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.syncbn TARGET lockstep_dist_tests NP 2 3 ARGS "[syncbn]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.zero TARGET lockstep_dist_tests NP 2 3 ARGS "[zero]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.quant TARGET lockstep_dist_tests NP 2 3 ARGS "[quant]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.join TARGET lockstep_dist_tests NP 2 3 ARGS "[join]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.stop TARGET lockstep_dist_tests NP 2 3 ARGS "[stop]" --warn NoTests TIMEOUT 300)
