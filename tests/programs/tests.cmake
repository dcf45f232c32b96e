# A ';' in a PASS_REGULAR_EXPRESSION splits it into a list of regexes, any of which passes: match
# a ';' in the output with '.'.
# Program tests on the success path pass on a line of their output (PASS_REGULAR_EXPRESSION), and CTest
# then ignores the exit status: their command runs under exit_status.sh, and this fails them when the
# job's status is not 0 (a rank that failed after the matched line).
# lockstep_success_test adds such a test; tests/CMakeLists.txt, once every test's properties are set,
# adds the failure on a non-zero status to each.
set(LOCKSTEP_EXIT_STATUS ${CMAKE_CURRENT_LIST_DIR}/exit_status.sh)
set(lockstep_success_tests "")
macro(lockstep_success_test name)
  add_test(NAME ${name} COMMAND ${LOCKSTEP_EXIT_STATUS} ${ARGN})
  list(APPEND lockstep_success_tests ${name})
endmacro()
function(lockstep_require_exit_zero test)
  get_test_property(${test} FAIL_REGULAR_EXPRESSION fail)
  if(NOT fail)
    set(fail "")
  endif()
  list(APPEND fail "lockstep-test: exit status [1-9]")
  set_tests_properties(${test} PROPERTIES FAIL_REGULAR_EXPRESSION "${fail}")
endfunction()

# Whole-job failure behaviour: one rank fails, the job must end with its message (no hang).
add_executable(lockstep_fail_one_rank ${CMAKE_CURRENT_LIST_DIR}/fail_one_rank.cpp)
target_link_libraries(lockstep_fail_one_rank PRIVATE lockstep::lockstep)
# One mode of fail_one_rank at `np` ranks: the job must end within 60 s with output matching `pass`
# (and, given a fifth argument, never matching it).
function(lockstep_failure_test name np mode pass)
  add_test(NAME failure.${name}.np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:lockstep_fail_one_rank> ${mode})
  set_tests_properties(failure.${name}.np${np} PROPERTIES TIMEOUT 60 LABELS dist PASS_REGULAR_EXPRESSION "${pass}")
  if(ARGC GREATER 4)
    set_tests_properties(failure.${name}.np${np} PROPERTIES FAIL_REGULAR_EXPRESSION "${ARGV4}")
  endif()
endfunction()
foreach(np 2 3)
  lockstep_failure_test(uncaught_exception ${np} throw "rank 1 of ${np}: uncaught exception: boom from the test")
  add_test(NAME failure.dead_peer.np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:lockstep_fail_one_rank> exit)
  # Not any failure (every rank crashing at start would fail too): mpirun names the rank that left
  # with its exit status, and no rank finishes the collective its dead peer never joins.
  set_tests_properties(failure.dead_peer.np${np} PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "Process name: +\\[\\[[0-9]+,1\\],1\\][^E]*Exit code: +3"
    FAIL_REGULAR_EXPRESSION "finished, which it must not")
  lockstep_failure_test(timeout ${np} timeout
    "rank [0-9] of ${np}: uncaught exception: allreduce #0 .*did not complete within 2000 ms")
  # The collective timeout stays at its 600 s default: only an abort during unwinding ends it in time.
  lockstep_failure_test(timeout_caught ${np} caught "rank [0-9]: [^\n]*aborting the job"
    "which the Runtime's end must not wait for")
  lockstep_failure_test(timeout_caught_after ${np} caught_after
    "MpiCommunicator destroyed after a wait\\(\\) on it timed out")
  # run_on_every_rank while rank 0's part outlasts the timeout: the others report their own failure,
  # or, where theirs succeeded, that they waited for the work named, not a bare all-gather timeout.
  lockstep_failure_test(every_rank_fails ${np} every_rank_fails
    "rank 1 of ${np}: uncaught exception: checkpoint x.pt does not exist on this node" "did not complete within")
  lockstep_failure_test(every_rank_waits ${np} every_rank_waits
    "rank 1 of ${np}: uncaught exception: Checkpointer: cannot resume from x.pt: another rank did not finish its part within 2000 ms")
  # An MPI error on one rank (a truncated receive) breaks its communicator: its next collective fails
  # at once naming the first error, instead of running out of step with the others'.
  lockstep_failure_test(mpi_error ${np} mpi_error
    "rank 1 of ${np}: uncaught exception: allreduce #1 [^\n]* was not run: this MpiCommunicator runs no collective since broadcast #0 [^\n]*failed inside MPI [^\n]*MPI_ERR_TRUNCATE"
    "finished, which it must not")
  # Rank 1's Runtime cannot choose (nccl without a GPU); the others' say so at once.
  lockstep_failure_test(backend_choice ${np} backend
    "launcher rank 0 caught: runtime: rank 1 could not choose a device and backend"
    "made its Runtime, which it must not")
endforeach()

# train_resnet end to end with quantization-aware training at 3 ranks on a slice of Fashion-MNIST: the
# int8 file is written (rank 0, atomically) and run on the quantized kernels.
if(LOCKSTEP_BUILD_EXAMPLES)
  set(qat_dir ${CMAKE_CURRENT_BINARY_DIR}/train_resnet_qat)
  lockstep_success_test(program.train_resnet_qat.np3
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:train_resnet>
                        --config ${PROJECT_SOURCE_DIR}/configs/demo_qat.yaml
                        --set data.train_subset=960 --set data.test_subset=300 --set model.width=8
                        --set trainer.epochs=2 --set quantization.begin_epoch=1 --set quantization.freeze_epoch=1.5
                        --set trainer.output_dir=${qat_dir} --set trainer.checkpoint.enabled=false
                        --set quantization.export_path=${qat_dir}/model_int8.pt)
  set_tests_properties(program.train_resnet_qat.np3 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2 FIXTURES_SETUP qat_file
    PASS_REGULAR_EXPRESSION "int8 model written to .*model_int8.pt.*int8 model on the quantized kernels: test accuracy [0-9.]+%")
  # A weight-only int8 file (no activation ranges) is valid but not what the whole-model int8 kernels
  # run: the run still succeeds and says why there is no int8 accuracy. Then a run in the same
  # directory that ends before quantization begins writes no file and must not evaluate the earlier
  # run's file as its own.
  set(qat_weights_dir ${CMAKE_CURRENT_BINARY_DIR}/train_resnet_qat_weight_only)
  set(qat_small_args --config ${PROJECT_SOURCE_DIR}/configs/demo_qat.yaml
                     --set data.train_subset=240 --set data.test_subset=100 --set model.width=4
                     --set trainer.epochs=1 --set trainer.output_dir=${qat_weights_dir}
                     --set trainer.checkpoint.enabled=false --set quantization.export_path=${qat_weights_dir}/int8.pt)
  lockstep_success_test(program.train_resnet_qat_weight_only.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${qat_small_args}
                        --set quantization.activations=false --set quantization.begin_epoch=0.5)
  set_tests_properties(program.train_resnet_qat_weight_only.np2 PROPERTIES TIMEOUT 200 LABELS dist PROCESSORS 2
    FIXTURES_SETUP qat_weight_only
    PASS_REGULAR_EXPRESSION "int8 model written to .*int8.pt.*int8 model on the quantized kernels: n/a \\(a weight-only export")
  if(LOCKSTEP_BUILD_BENCHMARKS)
    # int8_bench runs the int8 file on every engine this LibTorch has; on the weight-only file, which the
    # int8 kernels cannot run, it fails naming why (it printed the float32 rows alone and exited 0).
    lockstep_success_test(bench.int8.np1 $<TARGET_FILE:int8_bench> --config ${PROJECT_SOURCE_DIR}/configs/demo_qat.yaml
                          --set model.width=8 --int8 ${qat_dir}/model_int8.pt --limit 60 --batch 30 --repeats 1)
    set_tests_properties(bench.int8.np1 PROPERTIES TIMEOUT 120 FIXTURES_REQUIRED qat_file
      PASS_REGULAR_EXPRESSION "float32 plain [^\n]*\n[^\n]*float32 fake-quant [^\n]*\nint8 [a-z0-9]+ ")
    add_test(NAME bench.int8_weight_only.np1
             COMMAND ${LOCKSTEP_EXIT_STATUS} $<TARGET_FILE:int8_bench> --config ${PROJECT_SOURCE_DIR}/configs/demo_qat.yaml
                     --set model.width=4 --int8 ${qat_weights_dir}/int8.pt --limit 60 --repeats 1)
    set_tests_properties(bench.int8_weight_only.np1 PROPERTIES TIMEOUT 120 FIXTURES_REQUIRED qat_weight_only
      PASS_REGULAR_EXPRESSION "int8_bench: '[^\n]*int8.pt' is a weight-only export.*lockstep-test: exit status 1"
      FAIL_REGULAR_EXPRESSION "float32 plain")
  endif()
  lockstep_success_test(program.train_resnet_qat_not_begun.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${qat_small_args}
                        --set quantization.begin_epoch=5 --set quantization.freeze_epoch=6)
  set_tests_properties(program.train_resnet_qat_not_begun.np2 PROPERTIES TIMEOUT 200 LABELS dist PROCESSORS 2
    FIXTURES_REQUIRED qat_weight_only
    PASS_REGULAR_EXPRESSION "no int8 model written to .*int8.pt"
    FAIL_REGULAR_EXPRESSION "int8 model on the quantized kernels")
endif()

# Note [A cosine schedule stretched]: a finished cosine run resumed with more epochs (as the "run is
# complete" line advises) goes on, and says that the schedule now spans the longer run.
if(LOCKSTEP_BUILD_EXAMPLES)
  set(cosine_args --config ${PROJECT_SOURCE_DIR}/configs/demo.yaml
                  --set data.train_subset=240 --set data.test_subset=100 --set model.width=4
                  --set trainer.lr_schedule.warmup_steps=0
                  --set trainer.output_dir=${CMAKE_CURRENT_BINARY_DIR}/train_resnet_cosine_longer)
  lockstep_success_test(program.train_resnet_cosine_first.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${cosine_args}
                        --set trainer.epochs=1 --set trainer.checkpoint.resume=never)
  set_tests_properties(program.train_resnet_cosine_first.np2 PROPERTIES TIMEOUT 200 LABELS dist PROCESSORS 2
    FIXTURES_SETUP cosine_longer PASS_REGULAR_EXPRESSION "final test accuracy: [0-9.]+%")
  lockstep_success_test(program.train_resnet_cosine_longer.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${cosine_args}
                        --set trainer.epochs=2)
  set_tests_properties(program.train_resnet_cosine_longer.np2 PROPERTIES TIMEOUT 200 LABELS dist PROCESSORS 2
    FIXTURES_REQUIRED cosine_longer
    PASS_REGULAR_EXPRESSION "warning: [^\n]*checkpoint-step([0-9]+).pt was written by a run of [0-9]+ steps and this run has [0-9]+: the cosine learning-rate schedule now decays over the new length, so at step [0-9]+ it is 50% through its decay, not 100% .the learning rate jumps up.*final test accuracy: [0-9.]+%")
endif()

# early_stopping on real data (Fashion-MNIST, a constant lr on 1000 images, which soon overfit): every rank
# ends after the same epoch with the reason; a long evaluation shows progress lines on the way.
# The same command again (resume: auto) resumes, sees that it had stopped and ends at once.
if(LOCKSTEP_BUILD_EXAMPLES)
  set(early_args --config ${PROJECT_SOURCE_DIR}/configs/demo.yaml
                 --set data.train_subset=1000 --set data.test_subset=1000 --set model.width=8
                 --set trainer.batch_size=32 --set trainer.eval_batch_size=50 --set trainer.epochs=40
                 --set trainer.lr_schedule.kind=constant --set trainer.log_every=5
                 --set trainer.output_dir=${CMAKE_CURRENT_BINARY_DIR}/train_resnet_early_stopping
                 --set early_stopping.enabled=true --set early_stopping.patience=3)
  lockstep_success_test(program.train_resnet_early_stopping.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${early_args}
                        --set trainer.checkpoint.resume=never)
  set_tests_properties(program.train_resnet_early_stopping.np2 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2
    FIXTURES_SETUP early_stopping
    PASS_REGULAR_EXPRESSION "epoch 1/40 evaluating .5/10. .*training stopped after step [0-9]+ .the end of epoch [0-9]+.: early stopping: test_loss did not improve for 3 epochs .best [0-9.]+ at epoch [0-9]+.")
  lockstep_success_test(program.train_resnet_early_stopping_again.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet> ${early_args})
  set_tests_properties(program.train_resnet_early_stopping_again.np2 PROPERTIES TIMEOUT 300 LABELS dist
    PROCESSORS 2 FIXTURES_REQUIRED early_stopping
    PASS_REGULAR_EXPRESSION "resumed from .*checkpoint-step[0-9]+.pt.*training stopped after step [0-9]+ .*early stopping: test_loss did not improve.*final test accuracy: [0-9.]+%"
    FAIL_REGULAR_EXPRESSION "continues from it;epoch [0-9]+: train loss")
endif()

# A bad config value at 3 ranks: every rank fails alike before MPI starts, the job ends, and the
# message names the key and appears once (not once per rank).
if(LOCKSTEP_BUILD_EXAMPLES)
  add_test(NAME program.train_resnet_bad_config.np3
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:train_resnet>
                   --set trainer.epochs=three)
  set_tests_properties(program.train_resnet_bad_config.np3 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "config key 'trainer.epochs' at --set trainer.epochs=three: expected an integer"
    FAIL_REGULAR_EXPRESSION "expected an integer.*expected an integer")
  # A config that one rank alone cannot read (an MPMD launch whose last rank has a bad --set; a file
  # missing on one node): the ranks agree before the Runtime, every rank stops there, and rank 0
  # prints that rank's message (Note [A config one rank cannot read]). Before, only rank 0 printed,
  # and the others went on into MPI_Init, waiting for the rank that had left.
  add_test(NAME program.train_resnet_one_bad_config.np3
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet>
                   --set trainer.epochs=1 : -np 1 $<TARGET_FILE:train_resnet> --set trainer.epochs=three)
  set_tests_properties(program.train_resnet_one_bad_config.np3 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "1,0\\]<stderr>: *train_resnet: config key 'trainer.epochs' at --set trainer.epochs=three: expected an integer.* \\(on rank 2. every rank stops\\)"
    FAIL_REGULAR_EXPRESSION "expected an integer.*expected an integer;epoch 1")
  # --help on some ranks only: they would leave while the others start the Runtime; every rank stops.
  add_test(NAME program.train_resnet_help_on_some_ranks.np3
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 1 $<TARGET_FILE:train_resnet> --help
                   : -np 2 $<TARGET_FILE:train_resnet> --set trainer.epochs=1)
  set_tests_properties(program.train_resnet_help_on_some_ranks.np3 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "train_resnet: --help or --print-config on rank 0 but not on the others. every rank stops"
    FAIL_REGULAR_EXPRESSION "epoch 1")
endif()

# train_resnet at 3 ranks with the data-parallel options together: synchronised batch norm, gradient
# accumulation, clipping, AdamW with its state sharded over ranks (ZeRO) and weight averaging; the second run resumes
# the first's checkpoint (the sharded optimizer state included) and trains one more epoch.
if(LOCKSTEP_BUILD_EXAMPLES)
  set(dp_dir ${CMAKE_CURRENT_BINARY_DIR}/train_resnet_dp_options)
  set(dp_args --config ${PROJECT_SOURCE_DIR}/configs/demo.yaml
              --set data.train_subset=720 --set data.test_subset=300 --set model.width=8
              --set ddp.sync_batch_norm=true --set trainer.batch_size=8 --set trainer.accumulation_steps=2
              --set trainer.clip_grad_norm=5 --set optimizer.name=adamw --set optimizer.lr=0.003
              --set optimizer.weight_decay=0.01 --set optimizer.zero=true --set ema.enabled=true --set ema.decay=0.99
              --set trainer.output_dir=${dp_dir} --set trainer.log_every=0)
  add_test(NAME program.train_resnet_dp_options_clean COMMAND ${CMAKE_COMMAND} -E rm -rf ${dp_dir})
  set_tests_properties(program.train_resnet_dp_options_clean PROPERTIES FIXTURES_SETUP dp_options_clean)
  lockstep_success_test(program.train_resnet_dp_options.np3
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:train_resnet> ${dp_args}
                        --set trainer.epochs=1)
  set_tests_properties(program.train_resnet_dp_options.np3 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2
    FIXTURES_REQUIRED dp_options_clean FIXTURES_SETUP dp_options PASS_REGULAR_EXPRESSION "epoch 1: train loss [0-9.]+ acc")
  lockstep_success_test(program.train_resnet_dp_options_resume.np3
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:train_resnet> ${dp_args}
                        --set trainer.epochs=2)
  set_tests_properties(program.train_resnet_dp_options_resume.np3 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2
    FIXTURES_REQUIRED dp_options PASS_REGULAR_EXPRESSION "resum.*epoch 2: train loss [0-9.]+ acc")
endif()

# The custom-loop example at 3 ranks: uneven shards (16, 18 and 20 batches) under a ddp::Join, so rank 0
# shadows the last 4 steps of each epoch instead of leaving rank 2 waiting.
if(LOCKSTEP_BUILD_EXAMPLES)
  lockstep_success_test(program.custom_loop_uneven.np3
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:custom_loop>)
  set_tests_properties(program.custom_loop_uneven.np3 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "epoch 4 .*3 ranks. rank 0 trained 16 steps and shadowed 4")
  # ... and stopped by SIGUSR1 to mpirun during a long run: every rank leaves after the same step.
  add_test(NAME program.custom_loop_stop_signal.np3
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/custom_loop_stop.sh ${CMAKE_CURRENT_BINARY_DIR}/custom_loop_stop.log --
                   ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:custom_loop> 100000)
  set_tests_properties(program.custom_loop_stop_signal.np3 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "custom_loop_stop: every rank stopped by SIGUSR1")
endif()

# Ranks launched with different configurations (MPMD: a stale config on one node looks the same): every
# rank stops right after MPI starts with one error naming the key and each rank's value.
if(LOCKSTEP_BUILD_EXAMPLES)
  add_test(NAME program.train_resnet_config_mismatch.np2
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS}
                   -np 1 $<TARGET_FILE:train_resnet> --set optimizer.lr=0.1 :
                   -np 1 $<TARGET_FILE:train_resnet> --set optimizer.lr=0.05)
  set_tests_properties(program.train_resnet_config_mismatch.np2 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "config: the ranks disagree on optimizer.lr: 0.1 on rank 0. 0.05 on rank 1")
endif()

# train_resnet at 3 ranks stopped by SIGUSR1 sent to mpirun mid-epoch (as a scheduler would before its
# kill): every rank stops after the same step, the checkpoint is written, the job exits 138, and the
# same command resumes from that step and finishes (Note [Stop on signal]).
if(LOCKSTEP_BUILD_EXAMPLES)
  add_test(NAME program.train_resnet_stop_signal.np3
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/stop_on_signal.sh ${CMAKE_CURRENT_BINARY_DIR}/train_resnet_stop_signal --
                   ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:train_resnet>
                   --config ${PROJECT_SOURCE_DIR}/configs/demo.yaml
                   --set data.train_subset=2880 --set data.test_subset=300 --set model.width=8
                   --set trainer.batch_size=16 --set trainer.epochs=1 --set trainer.log_every=2
                   --set trainer.checkpoint.every_steps=0)
  set_tests_properties(program.train_resnet_stop_signal.np3 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "stop_on_signal: stopped after step [0-9]+ by SIGUSR1 .exit 138., resumed from it and finished")
endif()

# A regression task on real data: examples/denoise_images at 3 ranks (uneven shards) on a slice of
# Fashion-MNIST, with the mse loss and the mse/mae metrics of configs/denoise_fashion_mnist.yaml. One
# epoch must bring the test mse to well under the noisy input's own (at least 2x lower), and the epoch
# line must carry the regression metrics (no accuracy).
if(LOCKSTEP_BUILD_EXAMPLES)
  lockstep_success_test(program.denoise_images.np3
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:denoise_images>
                        --config ${PROJECT_SOURCE_DIR}/configs/denoise_fashion_mnist.yaml
                        --set data.train_subset=3000 --set data.test_subset=500 --set trainer.epochs=1 --set trainer.batch_size=16
                        --set trainer.log_every=0 --set trainer.checkpoint.enabled=false
                        --set trainer.output_dir=${CMAKE_CURRENT_BINARY_DIR}/denoise_images)
  set_tests_properties(program.denoise_images.np3 PROPERTIES TIMEOUT 300 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "epoch 1: train loss [0-9.]+ mse [0-9.e-]+ mae [0-9.e-]+ . test loss [0-9.]+ mse [0-9.e-]+ mae [0-9.e-]+ .*denoising: test mse [0-9.]+ against 0.2[0-9]+ for the noisy input .([2-9]|[1-9][0-9]+)\\.[0-9]x lower."
    FAIL_REGULAR_EXPRESSION " acc ")
endif()

# denoise_images without --config: every rank stops before MPI starts, the message once.
if(LOCKSTEP_BUILD_EXAMPLES)
  add_test(NAME program.denoise_images_no_config.np2
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:denoise_images>)
  set_tests_properties(program.denoise_images_no_config.np2 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "denoise_images: --config FILE is required"
    FAIL_REGULAR_EXPRESSION "required.*required")
  # denoise_images on its shipped config with `setting`: refused before any data is read, the message
  # (`pass`) once (`again` matches it printed twice).
  function(lockstep_denoise_refusal name setting pass again)
    add_test(NAME program.denoise_images_${name}.np2
             COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:denoise_images>
                     --config ${PROJECT_SOURCE_DIR}/configs/denoise_fashion_mnist.yaml --set ${setting})
    set_tests_properties(program.denoise_images_${name}.np2 PROPERTIES TIMEOUT 60 LABELS dist
      PASS_REGULAR_EXPRESSION "${pass}" FAIL_REGULAR_EXPRESSION "${again}")
  endfunction()
  # A classification loss on an image target.
  lockstep_denoise_refusal(classification_loss trainer.loss.name=cross_entropy
    "trainer.loss.name is 'cross_entropy', but this program regresses images" "regresses images.*regresses images")
  # A classification metric (accuracy used to fail at the first batch, through the terminate handler).
  lockstep_denoise_refusal(classification_metric trainer.metrics=[mse,accuracy,binary_accuracy]
    "trainer.metrics has accuracy, binary_accuracy, but this program regresses images"
    "regresses images.*regresses images")
  # model.quantize_activations is a model key this program does not read.
  lockstep_denoise_refusal(model_key model.quantize_activations=true "does not read model: remove them"
    "does not read.*does not read")
endif()

# The benchmarks, on small sizes: they run to their table at 2 and 3 ranks, and their command lines
# refuse what CLI11 alone would misread (octal, NaN). Their figures are not checked: machines are noisy.
if(LOCKSTEP_BUILD_BENCHMARKS)
  foreach(np 2 3)
    math(EXPR batch "4 * ${np}")
    lockstep_success_test(bench.scaling.np${np}
                          ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:scaling_bench>
                          --model mlp --mlp-width 64 --global-batch ${batch} --steps 2 --warmup 1)
    set_tests_properties(bench.scaling.np${np} PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
      PASS_REGULAR_EXPRESSION "mlp 784-4x64-10 +${batch} +${np} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+%")
    # Every size reduced correctly (#wrong 0, out of place and in place).
    lockstep_success_test(bench.allreduce.np${np}
                          ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np ${np} $<TARGET_FILE:allreduce_bench>
                          -b 1K -e 64K -f 8 --repeats 3 --seconds 0.005)
    set_tests_properties(bench.allreduce.np${np} PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
      PASS_REGULAR_EXPRESSION "65536 +16384 +float \\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +0 \\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +0 \\|"
      FAIL_REGULAR_EXPRESSION "\\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +[1-9][0-9]* \\|")
  endforeach()
  # bfloat16 at 9 ranks: correct sums above 256 used to round and count as wrong (the check's pattern
  # now stays within the integers the dtype holds exactly).
  lockstep_success_test(bench.allreduce_bfloat16.np9
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 9 $<TARGET_FILE:allreduce_bench>
                        -d bfloat16 -b 64 -e 1K -f 16 --repeats 1 --seconds 0.001)
  set_tests_properties(bench.allreduce_bfloat16.np9 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "1024 +512 +bfloat16 \\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +0 \\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +0 \\|"
    FAIL_REGULAR_EXPRESSION "\\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +[1-9][0-9]* \\|")
  # Sizes below one element are one size, measured once: 1, 2, 4 and 8 bytes of double are one row.
  lockstep_success_test(bench.allreduce_small_sizes.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:allreduce_bench>
                        -d double -b 1 -e 16 --repeats 1 --seconds 0.001)
  set_tests_properties(bench.allreduce_small_sizes.np2 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION " 8 +1 +double [^\n]*\n[^\n]* 16 +2 +double "
    FAIL_REGULAR_EXPRESSION " 8 +1 +double [^\n]*\n[^\n]* 8 +1 +double ")
  # T1 longer than the communicator's timeout (7 steps of about 0.2 s here against 0.5 s): the ranks
  # waiting for rank 0 to measure it must not time out (they waited in a barrier bounded by
  # LOCKSTEP_TIMEOUT_S, 600 s by default).
  lockstep_success_test(bench.scaling_long_t1.np2
                        ${CMAKE_COMMAND} -E env LOCKSTEP_TIMEOUT_S=0.5
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -x LOCKSTEP_TIMEOUT_S -np 2 $<TARGET_FILE:scaling_bench>
                        --model mlp --mlp-width 1024 --global-batch 512 --steps 6 --warmup 1)
  set_tests_properties(bench.scaling_long_t1.np2 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "mlp 784-4x1024-10 +512 +2 +[0-9.]+ ")
  # ddp_bench on a small MLP: every way's row (in order; rank 0's stderr lines may fall between them),
  # progress on stderr in --json mode (stdout holds the JSON alone), and a repeated list value refused
  # (two equal rows, the second's trace over the first's).
  lockstep_success_test(bench.ddp.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:ddp_bench>
                        --model mlp --mlp-width 64 --mlp-batch 8 --steps 2 --warmup 1 --comm-hook allreduce,fp16)
  set_tests_properties(bench.ddp.np2 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "mlp 784-4x64-10 +none .*mlp 784-4x64-10 +naive .*mlp 784-4x64-10 +lockstep/allreduce .*mlp 784-4x64-10 +lockstep/fp16 ")
  lockstep_success_test(bench.ddp_json.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:ddp_bench>
                        --model mlp --mlp-width 64 --mlp-batch 8 --steps 2 --warmup 1 --json)
  set_tests_properties(bench.ddp_json.np2 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "ddp_bench: mlp 784-4x64-10: step 3 of 3 done by each of 3 ways"
    FAIL_REGULAR_EXPRESSION "exposed%")
  add_test(NAME bench.ddp_repeated_value COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 1
           $<TARGET_FILE:ddp_bench> --bucket-cap-mb 25,1,25)
  set_tests_properties(bench.ddp_repeated_value PROPERTIES TIMEOUT 60
    PASS_REGULAR_EXPRESSION "--bucket-cap-mb: 25 is given twice")
  add_test(NAME bench.scaling_uneven_batch.np3
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 3 $<TARGET_FILE:scaling_bench> --global-batch 32)
  set_tests_properties(bench.scaling_uneven_batch.np3 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "--global-batch 32 does not split over 3 ranks. give a multiple of 3")
  add_test(NAME bench.octal_count COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 1
           $<TARGET_FILE:scaling_bench> --steps 010)
  set_tests_properties(bench.octal_count PROPERTIES TIMEOUT 60
    PASS_REGULAR_EXPRESSION "--steps: must be an integer >= 1, found '010'")
  add_test(NAME bench.nan_seconds COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 1
           $<TARGET_FILE:allreduce_bench> --seconds nan)
  set_tests_properties(bench.nan_seconds PROPERTIES TIMEOUT 60
    PASS_REGULAR_EXPRESSION "--seconds: must be a number >= 0, found 'nan'")
endif()

# Stopped inside an epoch: the final line says why there is no test accuracy (it said "no test set, or
# accuracy is not among trainer.metrics").
if(LOCKSTEP_BUILD_EXAMPLES)
  lockstep_success_test(program.train_resnet_stop_mid_epoch.np2
                        ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:train_resnet>
                        --config ${PROJECT_SOURCE_DIR}/configs/demo.yaml
                        --set data.train_subset=256 --set data.test_subset=64 --set model.width=4
                        --set trainer.stop_after_steps=1 --set trainer.checkpoint.enabled=false
                        --set trainer.output_dir=${CMAKE_CURRENT_BINARY_DIR}/train_resnet_stop_mid_epoch)
  set_tests_properties(program.train_resnet_stop_mid_epoch.np2 PROPERTIES TIMEOUT 120 LABELS dist PROCESSORS 2
    PASS_REGULAR_EXPRESSION "final test accuracy: n/a .the run stopped before epoch 1's evaluation: stop_after_steps .1..")
  # denoise_images reads neither callbacks' sections nor the model section: refused, named, once.
  add_test(NAME program.denoise_images_unread_sections.np2
           COMMAND ${MPIEXEC_EXECUTABLE} ${LOCKSTEP_MPIRUN_FLAGS} -np 2 $<TARGET_FILE:denoise_images>
                   --config ${PROJECT_SOURCE_DIR}/configs/denoise_fashion_mnist.yaml
                   --set early_stopping.enabled=true --set model.width=8)
  set_tests_properties(program.denoise_images_unread_sections.np2 PROPERTIES TIMEOUT 60 LABELS dist
    PASS_REGULAR_EXPRESSION "denoise_images: this program builds its own model and adds no callbacks, so it does not read early_stopping.enabled, model: remove them from the config"
    FAIL_REGULAR_EXPRESSION "does not read.*does not read")
endif()
