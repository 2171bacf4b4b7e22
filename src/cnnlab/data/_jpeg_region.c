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
 * treats the edges of a partial decode as image edges and may change the pixels there.
 *
 * One function: decode_region(data, scale_denom, left, top, right, bottom, gray) -> bytearray
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

static PyObject *decode_region(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    int denom, left, top, right, bottom, gray;
    if (!PyArg_ParseTuple(args, "y*iiiiip", &data, &denom, &left, &top, &right, &bottom, &gray))
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
    if (out_width < (JDIMENSION)width)
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
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, scale_denom, left, top, right, bottom, gray) -> bytearray: the pixels of "
     "[left, right) x [top, bottom) of a JPEG decoded at 1/scale_denom, rows of (right - left) RGB or grey "
     "bytes, equal to those of a full decode."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Region-of-interest JPEG decoding with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void)
{
    PyObject *m = PyModule_Create(&module);
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
