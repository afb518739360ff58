// DLPack in, tensor_view out. The structs follow the public DLPack specification
// (dlpack.h, ABI version 0.x "dltensor" capsules), written here from the spec.
#pragma once

#include <pybind11/pybind11.h>

#include "kvloom/tensor_view.h"

namespace kvloom {
namespace bind {

// A borrowed view of a Python tensor; keeps the exporting capsule alive while it lives.
struct borrowed {
  tensor_view view;
  pybind11::object keepalive;
};

// `what` names the argument in error messages.
borrowed from_dlpack(const pybind11::handle& obj, const char* what);

}  // namespace bind
}  // namespace kvloom
