// Stand-in for Gloo's <gloo/common/error.h>: see declarations.h.
#pragma once
#include "../declarations.h"
