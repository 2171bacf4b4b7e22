/* Decode only a region of a JPEG: the crop of a RandomResizedCrop, not the whole image.
 *
 * Pillow and simplejpeg decode every pixel; a training crop keeps about half of them on average. libjpeg-turbo
 * can skip the rest: jpeg_crop_scanline() leaves out the columns left and right of the region (no inverse DCT,
 * no upsampling, no colour conversion for them), jpeg_skip_scanlines() the rows above it (their entropy-coded
 * data is read, nothing else), and decoding stops after the region's last row. This is what TensorFlow's
 * decode_and_crop_jpeg does.
 *
 * The pixels are those of a full decode: the region is widened by one iMCU (the JPEG's block of 8 or 16
 * pixels) to the left, right and above before decoding, because libjpeg-turbo's smooth chroma upsampling
 * treats the edges of a partial decode as image edges and may change the pixels there. Columns are left out
 * only where jpeg_crop_scanline() is exact (see crop_is_exact); elsewhere the whole width is decoded (rows above
 * are still skipped and rows below never decoded).
 *
 * Hostile files: the image may hold at most max_pixels pixels (checked on the header, before any buffer is
 * allocated: a progressive file's coefficients take 2 bytes per sample whatever box is asked for) and at most
 * max_scans scans (a progressive file of a few KB can hold thousands, each one a pass over the whole image).
 *
 * One function: decode_region(data, scale_denom, left, top, right, bottom, gray, max_pixels=8192*8192,
 * max_scans=64) -> bytearray
 * The coordinates are those of the image decoded at 1/scale_denom (DCT scaling, as Pillow's draft mode). The
 * pixels are the box's rows of (right - left) RGB (or grey) bytes, contiguous, so that they need no copy
 * before torch resizes them. A JPEG error is a ValueError with libjpeg's message; a
 * premature end of data is an error too (Pillow: "image file is truncated"); other libjpeg warnings are
 * ignored, as Pillow ignores them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#define DEFAULT_MAX_PIXELS (8192LL * 8192LL)  /* cnnlab.data.images.Limits: the callers pass theirs */
#define DEFAULT_MAX_SCANS 64

struct region_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void fail(j_common_ptr cinfo)
{
    struct region_error *err = (struct region_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level)
{
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF)  /* truncated: gray fill would pass as pixels */
        fail(cinfo);
    if (level < 0)
        cinfo->err->num_warnings++;
}

/* The number of SOS markers (FF DA) in the data: at least its number of scans, since entropy-coded data never
 * holds FF DA (a coded FF is followed by 00). Counted before any buffer is allocated: libjpeg reads every scan
 * of a progressive file before its first row, each one a pass over the whole image. */
static Py_ssize_t count_sos(const unsigned char *data, Py_ssize_t len)
{
    Py_ssize_t count = 0;
    const unsigned char *p = data, *end = data + len;
    while (p < end - 1 && (p = memchr(p, 0xFF, (size_t)(end - 1 - p))) != NULL) {
        if (p[1] == 0xDA)
            count++;
        p++;
    }
    return count;
}

#if JPEG_LIB_VERSION >= 70
#define COMP_SCALED_W(c) ((c)->DCT_h_scaled_size)
#define COMP_SCALED_H(c) ((c)->DCT_v_scaled_size)
#define MIN_SCALED_W(ci) ((ci)->min_DCT_h_scaled_size)
#define MIN_SCALED_H(ci) ((ci)->min_DCT_v_scaled_size)
#else
#define COMP_SCALED_W(c) ((c)->DCT_scaled_size)
#define COMP_SCALED_H(c) ((c)->DCT_scaled_size)
#define MIN_SCALED_W(ci) ((ci)->min_DCT_scaled_size)
#define MIN_SCALED_H(ci) ((ci)->min_DCT_scaled_size)
#endif

/* Whether jpeg_crop_scanline() gives a full decode's pixels. It sets each component's downsampled width from
 * the sampling factors alone, which is wrong for a component whose inverse DCT libjpeg-turbo enlarged under
 * scaling (its DCT_scaled_size above the minimum: chroma of 4:2:0 and 4:1:0 at 1/2 and 1/4); the smooth upsampler
 * then reads the wrong width, and 4:1:0 at 1/2 and 1/4 differed by up to 211 levels. Such a component is exact
 * only where it needs no upsampling at all (4:2:0 scaled: its chroma is computed at full size). */
static int crop_is_exact(j_decompress_ptr cinfo)
{
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        jpeg_component_info *comp = &cinfo->comp_info[ci];
        int enlarged = COMP_SCALED_W(comp) != MIN_SCALED_W(cinfo) || COMP_SCALED_H(comp) != MIN_SCALED_H(cinfo);
        int full_size = comp->h_samp_factor * COMP_SCALED_W(comp) == cinfo->max_h_samp_factor * MIN_SCALED_W(cinfo) &&
                        comp->v_samp_factor * COMP_SCALED_H(comp) == cinfo->max_v_samp_factor * MIN_SCALED_H(cinfo);
        if (enlarged && !full_size)
            return 0;
    }
    return 1;
}

static PyObject *decode_region(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"data", "scale_denom", "left", "top", "right", "bottom", "gray", "max_pixels",
                               "max_scans", NULL};
    Py_buffer data;
    int denom, left, top, right, bottom, gray, max_scans = DEFAULT_MAX_SCANS;
    long long max_pixels = DEFAULT_MAX_PIXELS;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiiiip|Li", keywords, &data, &denom, &left, &top, &right,
                                     &bottom, &gray, &max_pixels, &max_scans))
        return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, got %d", denom);
    }

    struct jpeg_decompress_struct cinfo;
    struct region_error err;
    PyObject *volatile pixels = NULL;  /* a bytearray: numpy and torch may write to it */
    PyThreadState *volatile released = NULL;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = fail;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        if (released != NULL)
            PyEval_RestoreThread(released);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(pixels);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "JPEG: %s", err.message);
        return NULL;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (count_sos((const unsigned char *)data.buf, data.len) > max_scans) {
        PyErr_Format(PyExc_ValueError, "JPEG: more than %d scans (SOS markers)", max_scans);
        longjmp(err.jump, 1);
    }
    if ((long long)cinfo.image_width * (long long)cinfo.image_height > max_pixels) {
        PyErr_Format(PyExc_ValueError, "JPEG: claims %ux%u pixels, more than %lld", cinfo.image_width,
                     cinfo.image_height, max_pixels);
        longjmp(err.jump, 1);
    }
    cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);

    int width = (int)cinfo.output_width, height = (int)cinfo.output_height;
    if (left < 0 || top < 0 || right > width || bottom > height || left >= right || top >= bottom) {
        PyErr_Format(PyExc_ValueError, "region (%d, %d, %d, %d) is not inside the %dx%d image", left, top, right,
                     bottom, width, height);
        longjmp(err.jump, 1);
    }
    /* One iMCU of margin left, right and above: libjpeg-turbo's smooth chroma upsampling treats the edges of a
     * partial decode as image edges. Below, reading stops at the region's last row: the library itself reads
     * the context it needs for the rows it returns. */
    int imcu_w = cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
    int imcu_h = cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size;
    int x0 = left - imcu_w < 0 ? 0 : left - imcu_w;
    int x1 = right + imcu_w > width ? width : right + imcu_w;
    int y0 = top - imcu_h < 0 ? 0 : top - imcu_h;
    JDIMENSION x_offset = (JDIMENSION)x0, out_width = (JDIMENSION)(x1 - x0);
    if (out_width < (JDIMENSION)width && crop_is_exact(&cinfo))
        jpeg_crop_scanline(&cinfo, &x_offset, &out_width);  /* moves x_offset left to an iMCU boundary */
    else
        x_offset = 0, out_width = (JDIMENSION)width;

    size_t channels = (size_t)cinfo.output_components;
    size_t box_row = (size_t)(right - left) * channels, skip = (size_t)(left - (int)x_offset) * channels;
    /* a scratch row for the margins; freed with cinfo, and a failed allocation is a libjpeg error */
    JSAMPARRAY scratch = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                                    out_width * (JDIMENSION)channels, 1);
    int direct = skip == 0 && box_row == (size_t)out_width * channels;  /* decode straight into the output */
    pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(box_row * (size_t)(bottom - top)));
    if (pixels == NULL)
        longjmp(err.jump, 1);
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(pixels);

    released = PyEval_SaveThread();
    if (y0 > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    while (cinfo.output_scanline < (JDIMENSION)bottom) {
        int y = (int)cinfo.output_scanline;
        unsigned char *target = y >= top ? out + box_row * (size_t)(y - top) : NULL;
        JSAMPROW row = direct && target != NULL ? target : scratch[0];
        jpeg_read_scanlines(&cinfo, &row, 1);
        if (target != NULL && !direct)
            memcpy(target, scratch[0] + skip, box_row);
    }
    PyEval_RestoreThread(released);
    released = NULL;

    jpeg_abort_decompress(&cinfo);  /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return pixels;
}

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     "decode_region(data, scale_denom, left, top, right, bottom, gray, max_pixels=67108864, max_scans=64) -> "
     "bytearray: the pixels of [left, right) x [top, bottom) of a JPEG decoded at 1/scale_denom, rows of "
     "(right - left) RGB or grey bytes, equal to those of a full decode. ValueError for a file over max_pixels "
     "or with more than max_scans scans."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Region-of-interest JPEG decoding with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "DEFAULT_MAX_SCANS", DEFAULT_MAX_SCANS) < 0 ||
                      PyModule_AddIntConstant(m, "DEFAULT_MAX_PIXELS", (long)DEFAULT_MAX_PIXELS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    if (m != NULL && PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
                                             LIBJPEG_TURBO_VERSION_NUMBER
#else
                                             0
#endif
                                             ) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
