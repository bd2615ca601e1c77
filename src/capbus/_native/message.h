/*
 * _native/message.h: Forward declaration: request.c's Request.object() uses payload_object from
 * message.c, which comes after it (message.c needs request.c's RT_* flags and object codec).
 * Not compiled alone: module.c #includes it (one translation unit, see there).
 */
#ifndef CAPBUS_NATIVE_MESSAGE_H
#define CAPBUS_NATIVE_MESSAGE_H

static PyObject *payload_object(PyObject *payload, PyObject *args, PyObject *kw);

#endif /* CAPBUS_NATIVE_MESSAGE_H */
