/* vmtable_py.h — what the rest of aem's C core may call of the vmtable's Python face
 * (vmtable_py.c).  Include after pyaem.h (Python.h).
 *
 * Everything here is called with the GIL held.
 */
#ifndef AEM_VMTABLE_PY_H
#define AEM_VMTABLE_PY_H

#include <stddef.h>

/* aem.VMTableError (a ValueError): misuse of a vmtable or of a block. */
extern PyObject *AemVMTableError;

/* 1 if o is an aem VMTable (the C type or a subclass, e.g. aem.VMTable), else 0. */
int aem_vmtable_check_type(PyObject *o);

/* A new aem.Block of n >= 1 bytes from vmtable vmt holding a copy of data.
 * The allocation follows the vmtable's rules: on shortage its `shortage`
 * handlers run synchronously and the request is retried once; then the block
 * comes from the heap if the vmtable has fallback=True (block.fallback is
 * True), else MemoryError.  Returns NULL with an exception set on failure
 * (TypeError if vmt is not a VMTable, aem.VMTableError for n == 0 or n beyond
 * the largest block, MemoryError). */
PyObject *aem_vmtable_copy_in(PyObject *vmt, const void *data, size_t n);

/* Return block's memory to its vmtable (or to the heap for a fallback block)
 * unless it is already freed or detached: 0.  While buffer exports of the
 * block (memoryviews) are alive the memory cannot be reused: the block is
 * then freed when the Block object itself is deallocated (after the last
 * view), and this returns 0 as well.  -1 with an exception: block is not an
 * aem.Block (TypeError), or the vmtable's lock is unrecoverable. */
int aem_block_release(PyObject *block);

#endif
