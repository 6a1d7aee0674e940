/* agent.lease and agent.every's C half (core/ah_lua_lease.c): package.preload["agent.lease.core"].
 * Lua worker thread only. */
#ifndef AH_LUA_LEASE_H
#define AH_LUA_LEASE_H

struct lua_State;

/* The module table. Upvalue 1: the host's lease keeper (ah_leases_t *, a light userdata; NULL
 * when there is none: names are accepted, acquire fails with "store"). Stack: [-0, +1]. */
int ah_lua_lease_open(struct lua_State *L);

#endif
