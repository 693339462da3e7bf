// The Python extension module sinkhorn_ops._C: importing it loads the library, whose static
// initialisers register the operators; it defines no Python functions of its own.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
