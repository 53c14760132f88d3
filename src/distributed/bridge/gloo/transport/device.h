// Stand-in for Gloo's <gloo/transport/device.h>: see declarations.h.
#pragma once
#include "../declarations.h"
