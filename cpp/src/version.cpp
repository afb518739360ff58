#include "kvloom/kvloom.h"

namespace kvloom {
const char* version() { return KVLOOM_VERSION_STRING; }
}  // namespace kvloom
