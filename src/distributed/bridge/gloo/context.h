// Stand-in for Gloo's <gloo/context.h>: see declarations.h.
#pragma once
#include "declarations.h"
