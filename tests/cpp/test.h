// A minimal unit-test harness for the C++ core (no external framework needed).
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace kvtest {

struct test_case {
  const char* name;
  std::function<void()> fn;
};

std::vector<test_case>& registry();
void record_failure(const char* file, int line, const std::string& what);

struct registrar {
  registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

// Printable form of a checked value.
template <class T>
std::string show(const T& v) {
  return std::to_string(v);
}
inline std::string show(const std::string& v) { return "\"" + v + "\""; }

}  // namespace kvtest

#define KV_CAT2(a, b) a##b
#define KV_CAT(a, b) KV_CAT2(a, b)
#define TEST(name)                                                           \
  static void name();                                                        \
  static ::kvtest::registrar KV_CAT(reg_, name)(#name, name);                \
  static void name()

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) ::kvtest::record_failure(__FILE__, __LINE__, "CHECK(" #cond ")");  \
  } while (0)

#define CHECK_EQ(a, b)                                                                                  \
  do {                                                                                                  \
    const auto va_ = (a);                                                                               \
    const auto vb_ = (b);                                                                               \
    if (!(va_ == vb_))                                                                                  \
      ::kvtest::record_failure(__FILE__, __LINE__,                                                      \
                               "CHECK_EQ(" #a ", " #b "): " + ::kvtest::show(va_) + " != " + ::kvtest::show(vb_)); \
  } while (0)

#define CHECK_THROWS(expr, type)                                                             \
  do {                                                                                       \
    bool thrown_ = false;                                                                    \
    try {                                                                                    \
      expr;                                                                                  \
    } catch (const type&) {                                                                  \
      thrown_ = true;                                                                        \
    } catch (...) {                                                                          \
    }                                                                                        \
    if (!thrown_) ::kvtest::record_failure(__FILE__, __LINE__, "expected " #type " from " #expr); \
  } while (0)
