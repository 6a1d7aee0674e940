/* Redirects libcurl's own calls of poll() to a function of the plugin (ahc_poll_hook_install),
 * by rewriting the one entry of libcurl's global offset table that holds the address of libc's
 * poll. Nothing else of the process changes: every other caller of poll keeps libc's.
 *
 * Why: libcurl 7.88 calls poll() twice per request on a reused connection, with a zero timeout,
 * to ask whether the socket is readable (the liveness check of extract_if_dead before reuse, and
 * Curl_readwrite right after the request is sent), although agent.http's loop already watches
 * every socket with epoll; no option turns these off. The replacement (ahc_lua_http.c) answers
 * from what the loop knows when that is certain, and calls libc's poll otherwise.
 *
 * The entry is found in libcurl's dynamic relocations (R_*_JUMP_SLOT or R_*_GLOB_DAT naming
 * "poll"); it is rewritten only when it holds libc's poll (resolved at load: libcurl is linked
 * with BIND_NOW), with the page made writable for the write and read-only again when it lies in
 * the RELRO segment. Anything unexpected (another architecture, no such entry, mprotect refused)
 * leaves libcurl untouched and ahc_poll_hook_install returns false. Threads: call once, before
 * libcurl polls on another thread (pthread_once in the caller). */
#define _GNU_SOURCE
#include "ahc.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <curl/curl.h>

#if defined(__x86_64__)
#define RELOC_JUMP_SLOT R_X86_64_JUMP_SLOT
#define RELOC_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define RELOC_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define RELOC_GLOB_DAT R_AARCH64_GLOB_DAT
#endif

#if defined(RELOC_JUMP_SLOT) && defined(__LP64__)

typedef struct {
    uintptr_t base;       /* libcurl's load address */
    uintptr_t relro_from; /* its RELRO segment, [from, to); 0, 0 when none */
    uintptr_t relro_to;
} relro_t;

static int find_relro(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    relro_t *r = arg;
    if (info->dlpi_addr != r->base) {
        return 0;
    }
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_GNU_RELRO) {
            r->relro_from = info->dlpi_addr + ph->p_vaddr;
            r->relro_to = r->relro_from + ph->p_memsz;
        }
    }
    return 1;
}

/* The address of a dynamic-section pointer: glibc has already added the load address. */
static uintptr_t dyn_ptr(const struct link_map *lm, ElfW(Addr) p)
{
    return p < lm->l_addr ? lm->l_addr + p : p;
}

/* The GOT entry of libcurl that holds poll's address, or NULL. */
static void **find_poll_slot(const struct link_map *lm)
{
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) * tables[2] = {NULL, NULL};
    size_t sizes[2] = {0, 0};
    for (const ElfW(Dyn) *d = lm->l_ld; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB:
            symtab = (const ElfW(Sym) *)dyn_ptr(lm, d->d_un.d_ptr);
            break;
        case DT_STRTAB:
            strtab = (const char *)dyn_ptr(lm, d->d_un.d_ptr);
            break;
        case DT_JMPREL:
            tables[0] = (const ElfW(Rela) *)dyn_ptr(lm, d->d_un.d_ptr);
            break;
        case DT_PLTRELSZ:
            sizes[0] = d->d_un.d_val;
            break;
        case DT_RELA:
            tables[1] = (const ElfW(Rela) *)dyn_ptr(lm, d->d_un.d_ptr);
            break;
        case DT_RELASZ:
            sizes[1] = d->d_un.d_val;
            break;
        default:
            break;
        }
    }
    if (symtab == NULL || strtab == NULL) {
        return NULL;
    }
    for (int t = 0; t < 2; t++) {
        for (size_t i = 0; tables[t] != NULL && i < sizes[t] / sizeof(ElfW(Rela)); i++) {
            const ElfW(Rela) *r = &tables[t][i];
            unsigned long type = ELF64_R_TYPE(r->r_info);
            if (type != RELOC_JUMP_SLOT && type != RELOC_GLOB_DAT) {
                continue;
            }
            const ElfW(Sym) *sym = &symtab[ELF64_R_SYM(r->r_info)];
            if (strcmp(strtab + sym->st_name, "poll") == 0) {
                return (void **)(lm->l_addr + r->r_offset);
            }
        }
    }
    return NULL;
}

bool ahc_poll_hook_install(int (*fn)(struct pollfd *, unsigned long, int))
{
    Dl_info info;
    struct link_map *lm = NULL;
    if (dladdr1((void *)curl_multi_socket_action, &info, (void **)&lm, RTLD_DL_LINKMAP) == 0 ||
        lm == NULL) {
        return false;
    }
    void **slot = find_poll_slot(lm);
    if (slot == NULL || *slot != (void *)poll) {
        return false; /* not resolved to libc's poll (lazy binding, another hook): leave it */
    }
    relro_t relro = {.base = lm->l_addr};
    dl_iterate_phdr(find_relro, &relro);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t at = (uintptr_t)slot & ~((uintptr_t)page - 1);
    bool read_only = (uintptr_t)slot >= relro.relro_from && (uintptr_t)slot < relro.relro_to;
    if (read_only && mprotect((void *)at, (size_t)page, PROT_READ | PROT_WRITE) != 0) {
        return false;
    }
    __atomic_store_n(slot, (void *)fn, __ATOMIC_RELEASE);
    if (read_only) {
        mprotect((void *)at, (size_t)page, PROT_READ);
    }
    return true;
}

#else

bool ahc_poll_hook_install(int (*fn)(struct pollfd *, unsigned long, int))
{
    (void)fn;
    return false;
}

#endif
