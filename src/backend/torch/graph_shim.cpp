// kvgen's CUDA-graph shim: libtorch's at::cuda::CUDAGraph and stream switching, which tch does not
// expose (tch-rs issue #631), behind a small C API. build.rs compiles it against the torch
// headers with KVGEN_CUDA_GRAPHS when the CUDA headers are found, else as stubs that report
// "unavailable" (the backend then runs its decode steps eagerly). No C++ exception crosses the C
// boundary: each call returns 0 or 1 with the message in `err`.
#include <cstddef>
#include <cstring>
#include <exception>

static void kvgen_put_err(char* err, size_t len, const char* msg) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, msg, len - 1);
    err[len - 1] = '\0';
  }
}

#ifdef KVGEN_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>

struct KvgenGraph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  // Warm-up and capture run on a pooled side stream (capture is impossible on the default stream).
  c10::cuda::CUDAStream side;
  c10::cuda::CUDAStream prev;
  explicit KvgenGraph(c10::DeviceIndex d)
      : graph(), device(d), side(c10::cuda::getStreamFromPool(false, d)), prev(c10::cuda::getCurrentCUDAStream(d)) {}
};

#define KVGEN_GUARD(...)                                    \
  try {                                                     \
    __VA_ARGS__;                                            \
    return 0;                                               \
  } catch (const std::exception& e) {                       \
    kvgen_put_err(err, err_len, e.what());                  \
    return 1;                                               \
  } catch (...) {                                           \
    kvgen_put_err(err, err_len, "unknown C++ exception");   \
    return 1;                                               \
  }

extern "C" {
int kvgen_graph_new(int device, KvgenGraph** out, char* err, size_t err_len) {
  KVGEN_GUARD(*out = new KvgenGraph(static_cast<c10::DeviceIndex>(device)))
}
int kvgen_graph_enter_side(KvgenGraph* g, char* err, size_t err_len) {
  KVGEN_GUARD(g->prev = c10::cuda::getCurrentCUDAStream(g->device); c10::cuda::setCurrentCUDAStream(g->side))
}
int kvgen_graph_leave_side(KvgenGraph* g, char* err, size_t err_len) {
  KVGEN_GUARD(c10::cuda::setCurrentCUDAStream(g->prev))
}
// Thread-local capture mode: other threads (Python's torch) may keep using CUDA meanwhile.
int kvgen_graph_capture_begin(KvgenGraph* g, char* err, size_t err_len) {
  KVGEN_GUARD(g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal))
}
int kvgen_graph_capture_end(KvgenGraph* g, char* err, size_t err_len) {
  KVGEN_GUARD(g->graph.capture_end())
}
int kvgen_graph_replay(KvgenGraph* g, char* err, size_t err_len) {
  KVGEN_GUARD(g->graph.replay())
}
void kvgen_graph_free(KvgenGraph* g) {
  try {
    delete g;
  } catch (...) {
  }
}
int kvgen_graph_supported() { return 1; }
}

#else

struct KvgenGraph;
static const char* kvgen_no_graphs = "kvgen was built without the CUDA headers: CUDA graphs are unavailable";

extern "C" {
int kvgen_graph_new(int, KvgenGraph** out, char* err, size_t err_len) {
  *out = nullptr;
  kvgen_put_err(err, err_len, kvgen_no_graphs);
  return 1;
}
int kvgen_graph_enter_side(KvgenGraph*, char* err, size_t err_len) { kvgen_put_err(err, err_len, kvgen_no_graphs); return 1; }
int kvgen_graph_leave_side(KvgenGraph*, char* err, size_t err_len) { kvgen_put_err(err, err_len, kvgen_no_graphs); return 1; }
int kvgen_graph_capture_begin(KvgenGraph*, char* err, size_t err_len) { kvgen_put_err(err, err_len, kvgen_no_graphs); return 1; }
int kvgen_graph_capture_end(KvgenGraph*, char* err, size_t err_len) { kvgen_put_err(err, err_len, kvgen_no_graphs); return 1; }
int kvgen_graph_replay(KvgenGraph*, char* err, size_t err_len) { kvgen_put_err(err, err_len, kvgen_no_graphs); return 1; }
void kvgen_graph_free(KvgenGraph*) {}
int kvgen_graph_supported() { return 0; }
}
#endif
