# Multi-rank test groups: each runs the tests with the given Catch2 tags under mpirun at 2 and 3 ranks.
# Note [No test matched]: a tag that selects no test fails the group instead of passing with none run.
lockstep_add_mpi_test(NAME dist.comm TARGET lockstep_dist_tests NP 2 3 ARGS "[comm]" --warn NoTests)
lockstep_add_mpi_test(NAME dist.runtime TARGET lockstep_dist_tests NP 2 3 ARGS "[runtime]" --warn NoTests)
# Note [Threads from the CPUs a rank may use]: one rank confined to one CPU runs one thread, not one
# per core of the host (taskset is util-linux's, on every Debian).
find_program(LOCKSTEP_TASKSET taskset)
if(LOCKSTEP_TASKSET)
  add_test(NAME dist.runtime_one_cpu.np1
           COMMAND ${PROJECT_SOURCE_DIR}/tests/programs/on_one_cpu.sh ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS}
                   ${MPIEXEC_NUMPROC_FLAG} 1 ${MPIEXEC_PREFLAGS} $<TARGET_FILE:lockstep_dist_tests> ${MPIEXEC_POSTFLAGS}
                   "the runtime knows the world" --warn NoTests)
  set_tests_properties(dist.runtime_one_cpu.np1 PROPERTIES TIMEOUT 120 PROCESSORS 1 LABELS dist
                       ENVIRONMENT "LOCKSTEP_TIMEOUT_S=120;LOCKSTEP_TEST_EXPECT_THREADS=1")
endif()
# Note [CPU quota]: one rank in a cgroup allowed one CPU's time runs 1 thread, whatever the host's cores
# (skipped where the test cannot make a cgroup).
add_test(NAME dist.runtime_cpu_quota.np1
         COMMAND ${PROJECT_SOURCE_DIR}/tests/programs/in_cpu_quota.sh ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS}
                 ${MPIEXEC_NUMPROC_FLAG} 1 ${MPIEXEC_PREFLAGS} $<TARGET_FILE:lockstep_dist_tests> ${MPIEXEC_POSTFLAGS}
                 "the runtime knows the world" --warn NoTests)
set_tests_properties(dist.runtime_cpu_quota.np1 PROPERTIES TIMEOUT 120 PROCESSORS 1 LABELS dist SKIP_RETURN_CODE 77
                     ENVIRONMENT "LOCKSTEP_TIMEOUT_S=120;LOCKSTEP_TEST_EXPECT_THREADS=1")
lockstep_add_mpi_test(NAME dist.ddp TARGET lockstep_dist_tests NP 2 3 ARGS "[ddp]" --warn NoTests)
lockstep_add_mpi_test(NAME dist.train TARGET lockstep_dist_tests NP 2 3 ARGS "[train]" --warn NoTests TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.compress TARGET lockstep_dist_tests NP 2 3 ARGS "[compress]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.precision TARGET lockstep_dist_tests NP 2 3 ARGS "[precision]" --warn NoTests TIMEOUT 600)
lockstep_add_mpi_test(NAME dist.syncbn TARGET lockstep_dist_tests NP 2 3 ARGS "[syncbn]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.zero TARGET lockstep_dist_tests NP 2 3 ARGS "[zero]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.quant TARGET lockstep_dist_tests NP 2 3 ARGS "[quant]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.join TARGET lockstep_dist_tests NP 2 3 ARGS "[join]" --warn NoTests TIMEOUT 300)
lockstep_add_mpi_test(NAME dist.stop TARGET lockstep_dist_tests NP 2 3 ARGS "[stop]" --warn NoTests TIMEOUT 300)
