// Stand-in for the real header: the cluster code it serves is compiled only for sm_90+.
#pragma once
