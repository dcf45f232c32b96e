# Whole-job failure behaviour: one rank fails, the job must end with its message (no hang).
add_executable(lockstep_fail_one_rank ${CMAKE_CURRENT_LIST_DIR}/fail_one_rank.cpp)
target_link_libraries(lockstep_fail_one_rank PRIVATE lockstep::lockstep)
foreach(np 2 3)
  add_test(NAME failure.uncaught_exception.np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:lockstep_fail_one_rank> throw)
  set_tests_properties(failure.uncaught_exception.np${np} PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "rank 1 of ${np}: uncaught exception: boom from the test")
  add_test(NAME failure.dead_peer.np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:lockstep_fail_one_rank> exit)
  set_tests_properties(failure.dead_peer.np${np} PROPERTIES TIMEOUT 60 LABELS dist WILL_FAIL TRUE)
  add_test(NAME failure.timeout.np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:lockstep_fail_one_rank> timeout)
  set_tests_properties(failure.timeout.np${np} PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "rank [0-9] of ${np}: uncaught exception: allreduce #0 .*did not complete within 2000 ms")
endforeach()
