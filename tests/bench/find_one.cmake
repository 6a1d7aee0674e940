# bench_find_one: agent.mongo's find_one next to the same query in C (tests/bench/bench_find_one.c).
# Included from tests/bench/CMakeLists.txt; run by scripts/bench_find_one.sh. The C side links
# mongo-c-driver directly; the Lua side goes through the core's front, which loads the MongoDB
# plugin from the build directory: the program exports the core's functions for it, like agenthost.
add_executable(bench_find_one ${CMAKE_CURRENT_LIST_DIR}/bench_find_one.c)
set_target_properties(bench_find_one PROPERTIES ENABLE_EXPORTS ON)
target_link_libraries(bench_find_one PRIVATE "$<LINK_LIBRARY:WHOLE_ARCHIVE,agenthost_core>"
                                             PkgConfig::MONGOC PkgConfig::BSON)
target_compile_definitions(bench_find_one PRIVATE AH_BENCH_PLUGIN_DIR="${CMAKE_BINARY_DIR}")
add_dependencies(bench_find_one agenthost_mongo)
