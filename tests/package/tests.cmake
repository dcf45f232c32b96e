# The installed package works for a program outside the tree (find_package + lockstep::lockstep), and
# every rank exits 0 (lockstep_success_test, tests/programs/tests.cmake).
lockstep_success_test(package.find_package.np3
                      ${CMAKE_CURRENT_LIST_DIR}/run.sh ${PROJECT_BINARY_DIR} ${CMAKE_CURRENT_LIST_DIR}
                      ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS})
set_tests_properties(package.find_package.np3 PROPERTIES TIMEOUT 600 LABELS package
  PASS_REGULAR_EXPRESSION "rank 0 of 3: package all-reduce correct"
  FAIL_REGULAR_EXPRESSION "WRONG")
