// Stand-in for Gloo's <gloo/algorithm.h>: see declarations.h.
#pragma once
#include "declarations.h"
