// Stand-in for Gloo's <gloo/rendezvous/store.h>: see declarations.h.
#pragma once
#include "../declarations.h"
