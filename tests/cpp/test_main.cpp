#include <cstdio>
#include <exception>
#include <string>

#include "kvloom/device.h"
#include "test.h"

namespace kvtest {

std::vector<test_case>& registry() {
  static std::vector<test_case> r;
  return r;
}

static int g_failures_in_case = 0;

void record_failure(const char* file, int line, const std::string& what) {
  ++g_failures_in_case;
  std::printf("  %s:%d: %s\n", file, line, what.c_str());
}

}  // namespace kvtest

// kvloom_core_tests [substring]: runs the tests whose name contains the substring (all by default).
int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int passed = 0, failed = 0;
  for (const auto& t : kvtest::registry()) {
    if (!filter.empty() && std::string(t.name).find(filter) == std::string::npos) continue;
    kvtest::g_failures_in_case = 0;
    try {
      t.fn();
    } catch (const std::exception& e) {
      kvtest::record_failure(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    }
    if (kvtest::g_failures_in_case == 0) {
      ++passed;
      std::printf("PASS %s\n", t.name);
    } else {
      ++failed;
      std::printf("FAIL %s\n", t.name);
    }
  }
  // the pinned upload buffers are held for the life of the process: freed here, so that a leak
  // check at exit (compute-sanitizer --leak-check full) reports only real leaks
  kvloom::cuda_release_cached_memory();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
