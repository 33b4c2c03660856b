// Fused top-k expert routing. (Declarations are added with the routing op.)
#pragma once
#include <cstdint>
