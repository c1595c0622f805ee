// A tiny test harness for the C++ kernel tests (no gtest download). Each csrc/tests/test_<name>.cpp is
// its own executable registered with CTest, built with -DPPD_<NAME>_TEST_MAIN (see CMakeLists.txt):
// define cases with PPD_TEST, check with PPD_CHECK*, and end the file with
// `#ifdef PPD_<NAME>_TEST_MAIN int main() { return ppd::test::run_all(); } #endif`.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace ppd::test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

inline int run_all() {
  int failed = 0;
  for (const Case& c : registry()) {
    const int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      ++failures();
      std::printf("  unexpected exception: %s\n", e.what());
    }
    const bool ok = failures() == before;
    failed += ok ? 0 : 1;
    std::printf("[%s] %s\n", ok ? " OK " : "FAIL", c.name);
  }
  std::printf("%zu cases, %d failed\n", registry().size(), failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace ppd::test

#define PPD_TEST(name)                                                  \
  static void name();                                                   \
  static const ::ppd::test::Register name##_registration(#name, &name); \
  static void name()

#define PPD_CHECK(cond)                                                                 \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      ++::ppd::test::failures();                                                        \
      std::printf("  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);            \
    }                                                                                   \
  } while (0)

// |a - b| <= tol, and NaN never passes.
#define PPD_CHECK_NEAR(a, b, tol)                                                                   \
  do {                                                                                              \
    const double ppd_a = (a), ppd_b = (b), ppd_tol = (tol);                                         \
    if (!(std::fabs(ppd_a - ppd_b) <= ppd_tol)) {                                                   \
      ++::ppd::test::failures();                                                                    \
      std::printf("  %s:%d: %s = %.9g vs %s = %.9g (tol %.3g)\n", __FILE__, __LINE__, #a, ppd_a, #b, \
                  ppd_b, ppd_tol);                                                                  \
    }                                                                                               \
  } while (0)

// `expr` must throw a std::exception whose message contains `substr`.
#define PPD_CHECK_THROWS(expr, substr)                                                                 \
  do {                                                                                                 \
    bool ppd_thrown = false;                                                                           \
    try {                                                                                              \
      (void)(expr);                                                                                    \
    } catch (const std::exception& e) {                                                                \
      ppd_thrown = std::string(e.what()).find(substr) != std::string::npos;                            \
      if (!ppd_thrown) std::printf("  %s:%d: wrong message: %s\n", __FILE__, __LINE__, e.what());      \
    }                                                                                                  \
    if (!ppd_thrown) {                                                                                 \
      ++::ppd::test::failures();                                                                       \
      std::printf("  %s:%d: %s did not throw \"%s\"\n", __FILE__, __LINE__, #expr, substr);           \
    }                                                                                                  \
  } while (0)
