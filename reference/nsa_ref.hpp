// The API of the exact CPU reference (docs/spec.md): the forward pass and its types
// (forward.hpp), the backward pass (backward.hpp). Decoding with a KV cache is decode.hpp.
#pragma once

#include "backward.hpp"
#include "forward.hpp"
