// pybind11 face of the pair packer: module adadpo_megatron._packer.
// Takes C-contiguous int64 numpy arrays (packing.py converts any integer
// array first), releases the GIL for the packing itself, and hands the result
// vectors to numpy without copying.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "packer.h"

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style>;

using adadpo_packer::Buffer;

// Moves the buffer onto the heap and lets a capsule free it with the array.
py::array_t<int64_t> ToNumpy(Buffer<int64_t>&& values) {
  auto owned = std::make_unique<Buffer<int64_t>>(std::move(values));
  Buffer<int64_t>* raw = owned.get();
  py::capsule free_when_done(owned.release(),
                             [](void* p) { delete static_cast<Buffer<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(raw->size())}, raw->data(), free_when_done);
}

py::tuple PackPairs(const Int64Array& chosen, const Int64Array& rejected, int64_t capacity,
                    const std::string& algorithm, uint64_t seed, int64_t align) {
  if (chosen.ndim() != 1 || rejected.ndim() != 1 || chosen.shape(0) != rejected.shape(0)) {
    throw std::invalid_argument("chosen_lens and rejected_lens must be 1-D arrays of equal length");
  }
  const adadpo_packer::Algorithm algo = adadpo_packer::ParseAlgorithm(algorithm);
  const int64_t n = chosen.shape(0);
  const int64_t* chosen_ptr = chosen.data();
  const int64_t* rejected_ptr = rejected.data();
  adadpo_packer::PackPlan plan;
  {
    // The arrays stay alive (and must not be written by another thread) while
    // the pure C++ packing runs without the GIL.
    py::gil_scoped_release release;
    plan = adadpo_packer::PackPairs(chosen_ptr, rejected_ptr, n, capacity, algo, seed, align);
  }
  return py::make_tuple(ToNumpy(std::move(plan.pack_of_pair)), ToNumpy(std::move(plan.pair_order)),
                        ToNumpy(std::move(plan.pack_offsets)),
                        ToNumpy(std::move(plan.pack_tokens)));
}

py::array_t<int64_t> ShuffledIndices(int64_t n, uint64_t seed) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  return ToNumpy(adadpo_packer::ShuffledIndices(n, seed));
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
  m.doc() = "C++ pair packer (torch-free). Use adadpo_megatron.packing.pack_pairs instead.";
  m.def("pack_pairs", &PackPairs, py::arg("chosen_lens"), py::arg("rejected_lens"),
        py::arg("capacity"), py::arg("algorithm"), py::arg("seed"), py::arg("align"),
        "Pack pairs; returns (pack_of_pair, pair_order, pack_offsets, pack_tokens), int64 "
        "arrays. Inputs: C-contiguous int64 arrays [N]. Raises ValueError on bad input.");
  m.def("shuffled_indices", &ShuffledIndices, py::arg("n"), py::arg("seed"),
        "Fisher-Yates permutation of range(n) driven by SplitMix64(seed), int64 [n].");
}
