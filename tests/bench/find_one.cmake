# bench_find_one: agent.mongo's find_one next to the same query in C (tests/bench/bench_find_one.c).
# Included from tests/bench/CMakeLists.txt; run by scripts/bench_find_one.sh.
add_executable(bench_find_one ${CMAKE_CURRENT_LIST_DIR}/bench_find_one.c)
target_link_libraries(bench_find_one PRIVATE agenthost_core)
