# The installed package works for a program outside the tree (find_package + lockstep::lockstep).
# Under exit_status.sh (tests/programs/tests.cmake): every rank must also exit 0.
add_test(NAME package.find_package.np3
         COMMAND ${LOCKSTEP_EXIT_STATUS} ${CMAKE_CURRENT_LIST_DIR}/run.sh ${PROJECT_BINARY_DIR} ${CMAKE_CURRENT_LIST_DIR}
                 ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS})
set_tests_properties(package.find_package.np3 PROPERTIES TIMEOUT 600 LABELS package
  PASS_REGULAR_EXPRESSION "rank 0 of 3: package all-reduce correct"
  FAIL_REGULAR_EXPRESSION "WRONG")
lockstep_require_exit_zero(package.find_package.np3)
