/* Build helper (CMakeLists.txt): compiles one lua/<name>.lua into LuaJIT bytecode for
 * cmake/embed_lua.cmake, with its debug information (line numbers in tracebacks) and under the
 * chunk name given, against the LuaJIT the binary links, so that loading a module at run time
 * skips the parser. usage: lua_bytecode CHUNKNAME IN.lua OUT.bc; exit 0, or 1 with the reason
 * on stderr. */
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>

static int write_chunk(lua_State *L, const void *p, size_t n, void *ud)
{
    (void)L;
    return fwrite(p, 1, n, ud) == n ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s CHUNKNAME IN.lua OUT.bc\n", argv[0]);
        return 1;
    }
    int rc = 1;
    char *src = NULL;
    FILE *out = NULL;
    lua_State *L = luaL_newstate();
    FILE *in = fopen(argv[2], "rb");
    if (L == NULL || in == NULL) {
        fprintf(stderr, "lua_bytecode: cannot open %s\n", argv[2]);
        goto done;
    }
    size_t cap = 1 << 16, n = 0;
    src = malloc(cap);
    while (src != NULL && (n += fread(src + n, 1, cap - n, in)) == cap) {
        char *bigger = realloc(src, cap * 2);
        if (bigger == NULL) {
            break;
        }
        src = bigger;
        cap *= 2;
    }
    if (src == NULL || ferror(in)) {
        fprintf(stderr, "lua_bytecode: cannot read %s\n", argv[2]);
        goto done;
    }
    if (luaL_loadbuffer(L, src, n, argv[1]) != 0) {
        fprintf(stderr, "lua_bytecode: %s\n", lua_tostring(L, -1));
        goto done;
    }
    out = fopen(argv[3], "wb");
    if (out == NULL || lua_dump(L, write_chunk, out) != 0) {
        fprintf(stderr, "lua_bytecode: cannot write %s\n", argv[3]);
        goto done;
    }
    rc = 0;
done:
    if (out != NULL && fclose(out) != 0) {
        fprintf(stderr, "lua_bytecode: cannot write %s\n", argv[3]);
        rc = 1;
    }
    if (in != NULL) {
        fclose(in);
    }
    free(src);
    if (L != NULL) {
        lua_close(L);
    }
    return rc;
}
