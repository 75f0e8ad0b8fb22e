/*
 * A PKCS#11 module for tests: it forwards every call to a real module (SoftHSMv2) and can
 * behave like the HSMs SoftHSM cannot imitate.
 *
 *   XKS_SHIM_REAL      path of the real module (required)
 *   XKS_SHIM_IV        "zero-buffer": on C_EncryptInit(AES-GCM) with an all-zero 12-byte IV,
 *                      generate an IV and write it into the caller's IV buffer (Luna-style);
 *                      "appended": generate an IV and return ciphertext || tag || IV (nShield-style);
 *                      unset: pass IVs through, as SoftHSM does.
 *   XKS_SHIM_CONTROL   a directory; while it holds
 *                        fail       calls that touch the token return the CKR code in the file
 *                                   (hex, default CKR_DEVICE_ERROR), like a dead HSM;
 *                        delay_ms   C_Encrypt/C_Decrypt (not their size queries) sleep that many
 *                                   milliseconds first;
 *                        zero_random C_GenerateRandom returns zeros (a broken RNG);
 *                        decrypt_rv C_Decrypt completes, then returns the CKR code in the file
 *                                   (hex), as vendors report a failed tag check;
 *                        login_delay_ms  C_Login sleeps that many milliseconds before the real call
 *                                   (nanosleep resumes after a handled signal: only a kill ends it);
 *                      and the shim counts C_FindObjectsInit calls into find_count, and appends
 *                      "begin <pid>" and "end <pid> <rv hex>" around every C_Login to logins (so a
 *                      process killed inside C_Login leaves a begin without its end).
 *
 * Plain C with its own minimal PKCS#11 declarations, so it builds with nothing but gcc.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef unsigned char CK_BYTE;

typedef struct { CK_ULONG mechanism; void *pParameter; CK_ULONG ulParameterLen; } CK_MECHANISM;
typedef struct { CK_BYTE *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvBits; CK_BYTE *pAAD; CK_ULONG ulAADLen; CK_ULONG ulTagBits; } CK_GCM_PARAMS;
typedef struct { CK_BYTE major, minor; } CK_VERSION;

#define N_FUNCTIONS 68 /* CK_FUNCTION_LIST of PKCS#11 v2.40, in order */
typedef struct { CK_VERSION version; void *f[N_FUNCTIONS]; } FUNCTION_LIST;

enum { F_GET_FUNCTION_LIST = 3, F_GET_TOKEN_INFO = 6, F_OPEN_SESSION = 12, F_LOGIN = 18, F_FIND_OBJECTS_INIT = 26,
       F_FIND_OBJECTS = 27, F_ENCRYPT_INIT = 29, F_ENCRYPT = 30, F_DECRYPT_INIT = 33, F_DECRYPT = 34,
       F_GENERATE_RANDOM = 64 };

#define CKR_OK 0x0UL
#define CKR_DEVICE_ERROR 0x30UL
#define CKR_BUFFER_TOO_SMALL 0x150UL
#define CKM_AES_GCM 0x1087UL
#define IV_BYTES 12

typedef CK_RV (*fn_get_list)(FUNCTION_LIST **);
typedef CK_RV (*fn_token_info)(CK_ULONG, void *);
typedef CK_RV (*fn_open)(CK_ULONG, CK_ULONG, void *, void *, CK_SESSION_HANDLE *);
typedef CK_RV (*fn_login)(CK_SESSION_HANDLE, CK_ULONG, CK_BYTE *, CK_ULONG);
typedef CK_RV (*fn_find_init)(CK_SESSION_HANDLE, void *, CK_ULONG);
typedef CK_RV (*fn_find)(CK_SESSION_HANDLE, CK_OBJECT_HANDLE *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*fn_crypt_init)(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE);
typedef CK_RV (*fn_crypt)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
typedef CK_RV (*fn_random)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);

static FUNCTION_LIST *real;
static FUNCTION_LIST ours;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long find_count;

/* IVs generated in "appended" mode, waiting for the C_Encrypt of their session. */
#define PENDING 1024
static struct { CK_SESSION_HANDLE session; int used; CK_BYTE iv[IV_BYTES]; } pending[PENDING];

static const char *control_file(const char *name, char *buf, size_t size) {
    const char *dir = getenv("XKS_SHIM_CONTROL");
    if (!dir) return NULL;
    snprintf(buf, size, "%s/%s", dir, name);
    return buf;
}

static int read_control(const char *name, char *out, size_t size) {
    char path[4096];
    if (!control_file(name, path, sizeof path)) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(out, 1, size - 1, f);
    out[n] = 0;
    fclose(f);
    return 1;
}

static CK_RV injected(void) {
    char text[64];
    if (!read_control("fail", text, sizeof text)) return CKR_OK;
    CK_RV rv = strtoul(text, NULL, 16);
    return rv ? rv : CKR_DEVICE_ERROR;
}

static void sleep_ms(long ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

static void delay(void) {
    char text[64];
    if (!read_control("delay_ms", text, sizeof text)) return;
    sleep_ms(atol(text));
}

/* One line appended (O_APPEND: whole lines from many processes) to the control file `logins`. */
static void log_login(const char *line) {
    char path[4096];
    if (!control_file("logins", path, sizeof path)) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fputs(line, f);
    fclose(f);
}

static int iv_mode(const char *mode) {
    const char *value = getenv("XKS_SHIM_IV");
    return value && strcmp(value, mode) == 0;
}

static int all_zero(const CK_BYTE *p, CK_ULONG n) {
    for (CK_ULONG i = 0; i < n; i++) if (p[i]) return 0;
    return 1;
}

static void remember_iv(CK_SESSION_HANDLE session, const CK_BYTE *iv) {
    pthread_mutex_lock(&lock);
    int free_slot = -1;
    for (int i = 0; i < PENDING; i++) {
        if (pending[i].used && pending[i].session == session) { free_slot = i; break; }
        if (!pending[i].used && free_slot < 0) free_slot = i;
    }
    if (free_slot >= 0) {
        pending[free_slot].used = 1;
        pending[free_slot].session = session;
        memcpy(pending[free_slot].iv, iv, IV_BYTES);
    }
    pthread_mutex_unlock(&lock);
}

static int take_iv(CK_SESSION_HANDLE session, CK_BYTE *iv, int keep) {
    int found = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < PENDING; i++) {
        if (pending[i].used && pending[i].session == session) {
            memcpy(iv, pending[i].iv, IV_BYTES);
            if (!keep) pending[i].used = 0;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static CK_RV shim_GetTokenInfo(CK_ULONG slot, void *info) {
    CK_RV rv = injected();
    return rv ? rv : ((fn_token_info)real->f[F_GET_TOKEN_INFO])(slot, info);
}

static CK_RV shim_OpenSession(CK_ULONG slot, CK_ULONG flags, void *app, void *notify, CK_SESSION_HANDLE *out) {
    CK_RV rv = injected();
    return rv ? rv : ((fn_open)real->f[F_OPEN_SESSION])(slot, flags, app, notify, out);
}

static CK_RV shim_Login(CK_SESSION_HANDLE s, CK_ULONG user, CK_BYTE *pin, CK_ULONG len) {
    char line[128], text[64];
    snprintf(line, sizeof line, "begin %ld\n", (long)getpid());
    log_login(line);
    if (read_control("login_delay_ms", text, sizeof text)) sleep_ms(atol(text));
    CK_RV rv = injected();
    if (!rv) rv = ((fn_login)real->f[F_LOGIN])(s, user, pin, len);
    snprintf(line, sizeof line, "end %ld %lx\n", (long)getpid(), rv);
    log_login(line);
    return rv;
}

static CK_RV shim_FindObjectsInit(CK_SESSION_HANDLE s, void *template, CK_ULONG count) {
    CK_RV rv = injected();
    if (rv) return rv;
    char path[4096];
    pthread_mutex_lock(&lock);
    unsigned long n = ++find_count;
    if (control_file("find_count", path, sizeof path)) {
        FILE *f = fopen(path, "w");
        if (f) { fprintf(f, "%lu\n", n); fclose(f); }
    }
    pthread_mutex_unlock(&lock);
    return ((fn_find_init)real->f[F_FIND_OBJECTS_INIT])(s, template, count);
}

static CK_RV shim_FindObjects(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *out, CK_ULONG max, CK_ULONG *count) {
    CK_RV rv = injected();
    return rv ? rv : ((fn_find)real->f[F_FIND_OBJECTS])(s, out, max, count);
}

static CK_RV shim_EncryptInit(CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key) {
    CK_RV rv = injected();
    if (rv) return rv;
    fn_crypt_init init = (fn_crypt_init)real->f[F_ENCRYPT_INIT];
    if (!m || m->mechanism != CKM_AES_GCM || !m->pParameter) return init(s, m, key);
    CK_GCM_PARAMS *p = m->pParameter;
    if (p->ulIvLen != IV_BYTES || !all_zero(p->pIv, IV_BYTES)) return init(s, m, key);
    if (!iv_mode("zero-buffer") && !iv_mode("appended")) return init(s, m, key);
    CK_BYTE iv[IV_BYTES];
    rv = ((fn_random)real->f[F_GENERATE_RANDOM])(s, iv, IV_BYTES);
    if (rv) return rv;
    if (iv_mode("zero-buffer")) {
        memcpy(p->pIv, iv, IV_BYTES); /* the HSM writes its IV into the caller's buffer */
        return init(s, m, key);
    }
    CK_GCM_PARAMS q = *p;
    q.pIv = iv;
    CK_MECHANISM m2 = *m;
    m2.pParameter = &q;
    rv = init(s, &m2, key);
    if (rv == CKR_OK) remember_iv(s, iv);
    return rv;
}

static CK_RV shim_Encrypt(CK_SESSION_HANDLE s, CK_BYTE *data, CK_ULONG len, CK_BYTE *out, CK_ULONG *out_len) {
    CK_RV rv = injected();
    if (rv) return rv;
    if (out) delay();
    fn_crypt encrypt = (fn_crypt)real->f[F_ENCRYPT];
    CK_BYTE iv[IV_BYTES];
    if (!take_iv(s, iv, 1)) return encrypt(s, data, len, out, out_len);
    CK_ULONG inner = 0;
    rv = encrypt(s, data, len, NULL, &inner); /* size query: leaves the operation active */
    if (rv) { take_iv(s, iv, 0); return rv; }
    if (!out) { *out_len = inner + IV_BYTES; return CKR_OK; }
    if (*out_len < inner + IV_BYTES) { *out_len = inner + IV_BYTES; return CKR_BUFFER_TOO_SMALL; }
    CK_ULONG n = *out_len;
    rv = encrypt(s, data, len, out, &n);
    take_iv(s, iv, 0);
    if (rv) return rv;
    memcpy(out + n, iv, IV_BYTES); /* ciphertext || tag || IV */
    *out_len = n + IV_BYTES;
    return CKR_OK;
}

static CK_RV shim_DecryptInit(CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key) {
    CK_RV rv = injected();
    return rv ? rv : ((fn_crypt_init)real->f[F_DECRYPT_INIT])(s, m, key);
}

static CK_RV shim_Decrypt(CK_SESSION_HANDLE s, CK_BYTE *data, CK_ULONG len, CK_BYTE *out, CK_ULONG *out_len) {
    CK_RV rv = injected();
    if (rv) return rv;
    if (out) delay();
    fn_crypt decrypt = (fn_crypt)real->f[F_DECRYPT];
    char text[64];
    if (!read_control("decrypt_rv", text, sizeof text)) return decrypt(s, data, len, out, out_len);
    /* Finish the real operation (so the session is free again, as after any error), then fail. */
    CK_ULONG n = 0;
    if (decrypt(s, data, len, NULL, &n) == CKR_OK) {
        CK_BYTE *scratch = malloc(n + 1);
        decrypt(s, data, len, scratch, &n);
        free(scratch);
    }
    return strtoul(text, NULL, 16);
}

static CK_RV shim_GenerateRandom(CK_SESSION_HANDLE s, CK_BYTE *out, CK_ULONG len) {
    CK_RV rv = injected();
    if (rv) return rv;
    char text[8];
    if (read_control("zero_random", text, sizeof text)) { memset(out, 0, len); return CKR_OK; }
    return ((fn_random)real->f[F_GENERATE_RANDOM])(s, out, len);
}

CK_RV C_GetFunctionList(FUNCTION_LIST **list) {
    pthread_mutex_lock(&lock);
    if (!real) {
        const char *path = getenv("XKS_SHIM_REAL");
        void *handle = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        fn_get_list get = handle ? (fn_get_list)dlsym(handle, "C_GetFunctionList") : NULL;
        if (!get || get(&real) != CKR_OK || !real) { real = NULL; pthread_mutex_unlock(&lock); return 0x5UL; }
        ours = *real;
        ours.f[F_GET_FUNCTION_LIST] = (void *)C_GetFunctionList;
        ours.f[F_GET_TOKEN_INFO] = (void *)shim_GetTokenInfo;
        ours.f[F_OPEN_SESSION] = (void *)shim_OpenSession;
        ours.f[F_LOGIN] = (void *)shim_Login;
        ours.f[F_FIND_OBJECTS_INIT] = (void *)shim_FindObjectsInit;
        ours.f[F_FIND_OBJECTS] = (void *)shim_FindObjects;
        ours.f[F_ENCRYPT_INIT] = (void *)shim_EncryptInit;
        ours.f[F_ENCRYPT] = (void *)shim_Encrypt;
        ours.f[F_DECRYPT_INIT] = (void *)shim_DecryptInit;
        ours.f[F_DECRYPT] = (void *)shim_Decrypt;
        ours.f[F_GENERATE_RANDOM] = (void *)shim_GenerateRandom;
    }
    pthread_mutex_unlock(&lock);
    *list = &ours;
    return CKR_OK;
}
