# lockstep_add_mpi_test(NAME <name> TARGET <exe> NP <n>... [ARGS <args>...] [TIMEOUT <s>] [LABELS <l>...])
# registers one CTest test per world size, "<name>.np<n>", that runs <exe> under mpirun with the
# flags this machine needs (root, more ranks than cores) so that nobody has to remember them.
set(LOCKSTEP_MPIRUN_FLAGS --allow-run-as-root --oversubscribe --bind-to none --tag-output
    CACHE STRING "Flags Lockstep's scripts and tests pass to mpirun")
function(lockstep_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET;TIMEOUT" "NP;ARGS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  foreach(np IN LISTS T_NP)
    add_test(NAME ${T_NAME}.np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} ${MPIEXEC_NUMPROC_FLAG} ${np}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${T_TARGET}> ${MPIEXEC_POSTFLAGS} ${T_ARGS})
    set_tests_properties(${T_NAME}.np${np} PROPERTIES TIMEOUT ${T_TIMEOUT} PROCESSORS ${np}
                         LABELS "dist;${T_LABELS}" ENVIRONMENT "LOCKSTEP_TIMEOUT_S=120")
  endforeach()
endfunction()
